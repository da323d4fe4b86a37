"""Run mutmut mutants one by one against chosen test files, each in a forked child (docs/testing.md).

mutmut 3.8 runs every test that touches a mutated function, which for the patch machinery is most of
the suite (minutes a mutant), and it reports a mutant whose tests crash as a survivor. This runs a
mutant against the test files of its module only, in a fork of one warm interpreter (torch and
diffusers imported once), and calls it killed when pytest fails and survived when pytest passes.

    cd COPY/mutants && PYTHONPATH=MUTMUT_PACKAGES python ../../tests/mutation_recheck.py OUT.log \\
        tests/test_lina.py[,tests/test_weights.py] NAME [NAME ...]

NAME as `mutmut results` prints it; one line per mutant is appended to OUT.log:
`NAME killed|survived|timeout|exit N SECONDSs`. A mutant whose tests run longer than MUTANT_TIMEOUT
seconds (default 600; a mutated loop bound can make them endless) is stopped and logged `timeout`,
which counts as killed (its tests did not pass).
"""

import os
import signal
import sys
import time

import diffusers  # noqa: F401  (imported once, before forking)
import pytest
import torch  # noqa: F401

sys.path.insert(0, os.getcwd())   # the mutated package in the mutants folder comes first


def main(out_path: str, tests: str, names: list[str]) -> None:
    import diffusers_ext  # noqa: F401

    with open(out_path, "a") as out:
        for name in names:
            start = time.time()
            pid = os.fork()
            if pid == 0:   # the child: select the mutant (mutmut's trampolines read this) and run the tests
                os.environ["MUTANT_UNDER_TEST"] = name
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *tests.split(",")])
                os._exit(int(code))
            verdict = _wait(pid, start + float(os.environ.get("MUTANT_TIMEOUT", 600)))
            print(name, verdict, f"{time.time() - start:.1f}s", file=out, flush=True)


def _wait(pid: int, deadline: float) -> str:
    """The verdict of the child `pid`, killed at `deadline` (time.time()) if still running."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return {1: "killed", 0: "survived"}.get(code, f"exit {code}")
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.1)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
