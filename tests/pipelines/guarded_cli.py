"""``python -m tests.pipelines.guarded_cli ARGS``: the ``stylid`` CLI with Ray's start-up and model loads forbidden.

Reaching ``init_ray`` or a face-model factory prints ``REACHED <what>`` and exits with status 70, so a test can
tell "failed before Ray and models" (status 2, one line) from "failed later" without timing anything.
"""

from __future__ import annotations

import sys


def _forbid(module, name: str, what: str) -> None:
    def reached(*args, **kwargs):
        print(f"REACHED {what}", file=sys.stderr)
        sys.exit(70)

    setattr(module, name, reached)


def main() -> int:
    import jobs.customize
    import jobs.run
    import pipelines.stages
    from jobs.cli import main as cli_main

    _forbid(jobs.run, "init_ray", "init_ray")
    _forbid(jobs.customize, "init_ray", "init_ray")
    _forbid(pipelines.stages, "create_face_analyzer", "a face model load")
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
