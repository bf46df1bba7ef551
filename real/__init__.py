"""Real mode: worker containers, the worker server that runs inside them, and their clients.

The submodules that talk to Docker import the docker SDK and pyzmq, which the `docker` extra
installs. The core package runs without them.
"""
