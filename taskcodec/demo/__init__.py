"""The main job: a local server and a virtual camera streaming through the edge runtime (top layer)."""
