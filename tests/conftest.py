import pytest

from tests.helpers import fill, small_meta

from dfkd import store


@pytest.fixture(params=["zarr", "webdataset"])
def backend(request):
    return request.param


@pytest.fixture
def full_store(tmp_path, backend):
    """A complete small store in the parametrized backend."""
    path = str(tmp_path / ("s.zarr" if backend == "zarr" else "s.wds"))
    writer = store.create(path, small_meta())
    fill(writer)
    writer.finalize()
    return path


@pytest.fixture(autouse=True)
def _progress_not_quiet():
    """`--quiet` silences progress for the whole process; each test starts and ends with it off."""
    from dfkd.store.toolbox.progress import set_quiet

    set_quiet(False)
    yield
    set_quiet(False)
