"""The torch-free edge runtime: source (sources.py) -> preprocess (preprocess.py) -> ONNX encoder + range coder
(encoder.py) -> durable spool (spool.py) -> WebSocket uplink (uplink.py), with status/metrics (status.py), the
capture loop (capture.py), the CLI (cli.py), a protocol-speaking fake server for tests (fakeserver.py) and the
per-stage profiler (profile.py)."""
