"""Synthetic data and loopback servers for the tests (tests/) and the benchmarks (bench/).

Nothing here is used by the pipeline itself. Import the submodule you need; this package
imports nothing, so `import testkit` costs nothing, and moto/boto3 load only when an S3
server is started or a client made.

    testkit.synth       tiny synthetic chest-X-ray archives and folders in the real layouts
    testkit.dicomfiles  write_dicom (synthetic DICOM files) and PHI (made-up patient data for the privacy tests)
    testkit.httpserver  LoopbackServer: one payload over HTTP on 127.0.0.1 (ranges, drops, errors)
    testkit.s3server    S3Server: moto's S3 and IAM on 127.0.0.1, in a child process
    testkit.serveapp    running: an ASGI app (cxr serve's) under uvicorn on 127.0.0.1 in a thread
    testkit.pipeline    sh (run a command as `make repro` does) and build_tiny_pipeline (a
                            throw-away git+DVC copy of the project, reproduced once on a synthetic archive)
    testkit.backbone    the tiny pipeline's untrained backbone weights, whose features still differ between images
"""
