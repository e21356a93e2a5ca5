"""`python -m taskcodec.server.cluster gateway|worker|…`: the scale-out processes without the other parts."""

from taskcodec.server.cluster.cli import cluster_app

if __name__ == "__main__":
    cluster_app()
