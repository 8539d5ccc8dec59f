"""Getting the data: fetch and prune the archive, the split manifest, the one image loader, DICOM, caches."""
