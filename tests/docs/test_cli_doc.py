"""docs/cli.md lists exactly the schema's config keys and every command the CLI has."""

import re
from pathlib import Path

from shardgrad import cli
from shardgrad.runtime.config import SCHEMA

DOC = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()


def test_every_key_listed_exists():
    keys = DOC[DOC.index("## Config keys"):]
    listed = re.findall(r"^\| `(\w+)\.(\w+)` \|", keys, re.M)
    assert len(listed) > 40
    for section, key in listed:
        assert key in SCHEMA.get(section, {}), f"{section}.{key}"
    missing = [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys if (s, k) not in listed]
    assert not missing, f"config keys without a row in docs/cli.md: {missing}"


def test_every_command_is_listed():
    subs = next(a for a in cli._parser()._actions if a.dest == "command").choices
    for name in subs:
        assert re.search(rf"`shardgrad {name}\b|\b{name} RUN_DIR", DOC), name
