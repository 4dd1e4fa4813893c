"""`python -m jaxcollab.launch`, killed with SIGKILL part-way through one training (for test_launch.py).

usage: python launch_worker.py KILL_SPEC LAUNCH_ARGS...
KILL_SPEC = PREFIX:N: the process kills itself when the training whose key starts with PREFIX asks for
its batch N+1 (after N steps), the way a crash or preemption would stop it mid-round.
"""

import os
import signal
import sys

from jaxcollab import launch, train


def main() -> None:
    prefix, _, count = sys.argv[1].partition(":")
    limit = int(count)
    original_fit = train.Trainer.fit

    def fit(self, batches, num_steps=None, desc="train"):
        if not desc.startswith(prefix):
            return original_fit(self, batches, num_steps, desc)

        def doomed():
            for index, batch in enumerate(batches):
                if index == limit:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield batch

        return original_fit(self, doomed(), num_steps, desc)

    train.Trainer.fit = fit
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    launch.main()


if __name__ == "__main__":
    main()
