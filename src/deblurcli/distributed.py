"""Many processes, one ``deblur`` run: ``accelerate launch -m deblurcli deblur IN OUT``.

Under a launcher (``accelerate launch``, ``torchrun``: the ``WORLD_SIZE`` environment variable is
above 1) every process plans the same complete job list (so the input guard sees every input),
takes every ``count``-th job starting at its own ``index`` (the same interleaved split as
``--shard``), and at the end the results of all processes are gathered, so that one summary lists
the failures of every process. Without a launcher nothing here imports accelerate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch


def launched_processes() -> int:
    """Number of processes a launcher started (1 when none did)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass
class ProcessGroup:
    """This process's place among the launched ones.

    Attributes:
        index: 0-based process number (0 is the main process).
        count: number of processes.
        device: the device accelerate gives this process (``cuda:LOCAL_RANK`` on GPUs, else cpu).
        state: accelerate's ``PartialState``.
    """

    index: int
    count: int
    device: torch.device
    state: Any

    @property
    def is_main(self) -> bool:
        """Whether this is the main process (the one that reports)."""
        return self.index == 0

    def wait(self) -> None:
        """Wait until every process gets here (e.g. until the main process has reported)."""
        self.state.wait_for_everyone()

    def gather(self, items: list) -> list:
        """Every process's ``items`` (picklable), concatenated in process order, on every
        process."""
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))


def process_group(cpu: bool) -> Optional[ProcessGroup]:
    """The process group when a launcher started several processes, else None.

    ``cpu``: use the CPU (gloo) even where CUDA is available.
    """
    if launched_processes() <= 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    return ProcessGroup(index=state.process_index, count=state.num_processes,
                        device=torch.device(state.device), state=state)


def cpu_threads_share(group: Optional[ProcessGroup]) -> int:
    """torch threads for one process on the CPU: the usable cores divided among the processes
    (0 = all of them, when not launched)."""
    if group is None:
        return 0
    from deblurcli.device import usable_cpu_count

    return max(1, usable_cpu_count() // group.count)


def gather_results(group: ProcessGroup, results: list, jobs: list) -> list:
    """The :class:`~deblurcli.batch.FileResult` lists of every process, in the order of the
    complete job list ``jobs``."""
    order = {job: i for i, job in enumerate(jobs)}
    return sorted(group.gather(results), key=lambda r: order.get(r.job, len(order)))
