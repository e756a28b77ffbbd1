"""The embedded cluster from a plain script: a call from unguarded top-level code is told apart
from one under ``if __name__ == "__main__":`` (only the first makes spawned workers rerun it)."""

import subprocess
import sys

SCRIPT = '''
from nic_pipeline.runtime.cluster import unguarded_main_script
def start():
    return unguarded_main_script()
print("top", start() is not None)
if __name__ == "__main__":
    print("guarded", start() is not None)
'''


def test_unguarded_top_level_is_detected_and_the_guard_is_respected(tmp_path):
    script = tmp_path / "snip.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["top True", "guarded False"]
    code = "from nic_pipeline.runtime.cluster import unguarded_main_script as u; print(u())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "None"
