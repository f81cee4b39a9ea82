import os
import shutil
import tempfile

import pytest


@pytest.fixture
def host_dir():
    """A host directory the sandbox can see (outside /tmp, which it replaces), world-writable
    so that only the read-only root stops a write, and reachable by the sandbox's uid."""
    path = tempfile.mkdtemp(dir="/var/tmp")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def refusing_bwrap(host_dir):
    """A `bwrap` that fails the way bubblewrap does without user namespaces."""
    path = os.path.join(host_dir, "bwrap")
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    os.chmod(path, 0o755)
    return path
