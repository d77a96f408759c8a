"""Records (_record) behave as the dataclasses they replaced: copy, deepcopy and pickle."""
from __future__ import annotations

import copy
import pickle

import pytest

from forkpoint._qkeys import parse_scope

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("text", ["process", "host", "redis://u:pw@127.0.0.1:6380/3"])
def test_a_scope_copies_and_pickles_as_the_frozen_dataclass_did(text):
    s = parse_scope(text)
    for twin in (copy.copy(s), copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert twin == s and hash(twin) == hash(s) and str(twin) == str(s)
    with pytest.raises(AttributeError):
        s.host = "elsewhere"

