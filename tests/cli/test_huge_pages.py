"""The CLI turns on torch's 2 MiB-page allocation unless the user chose otherwise."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("preset,want", [(None, "1"), ("0", "0")])
def test_cli_sets_thp_unless_user_chose(preset, want):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = ("import os, sys; from ssmkit.cli import main; main(['tasks']); "
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == want
