import os
import sys
import traceback

from mtml.cli import main

if "MTML_LAUNCHED" in os.environ:
    # a rank started by mtml's own launcher (`--nproc`, MTML_LAUNCH=spawn) leaves the way a forked rank does: its
    # output flushed, then os._exit, skipping interpreter teardown, where a C++ thread of the torch.distributed
    # stack was occasionally destroyed while joinable ("terminate called without an active exception", SIGABRT
    # after a completed run: 1 of 8 spawn runs of the PCGrad test config)
    code = 1
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
else:
    main()
