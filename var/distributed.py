"""Start-up checks for multi-process runs (``accelerate launch``) shared by training and evaluation.

Two launches look fine but are not: ``accelerate launch --cpu --num_processes N`` starts ONE process whatever N
is, and ``accelerate launch --multi_gpu`` on a machine without GPUs starts N processes that each set up no
process group, so each trains alone (all writing the same run directory).  :func:`check_launch` compares what
the launcher asked for with the processes accelerate actually joined and stops with one line saying how to
launch instead.
"""

from __future__ import annotations

import os
import warnings

CPU_LAUNCH = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n} -m var.cli ..."
_MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class LaunchError(ValueError):
    """The processes this run joined are not the ones its launcher started (a usage error, like bad input)."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def launch_problem(num_processes: int) -> str | None:
    """Why the launch does not give ``num_processes`` (what accelerate set up) the processes asked for, or None."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size != num_processes:
        if world_size > num_processes:
            cause = ("accelerate found no GPU, so it set up no process group" if not _flag("ACCELERATE_USE_CPU")
                     else "they did not join one process group")
            return (f"the launcher started {world_size} processes (WORLD_SIZE={world_size}) but each runs alone "
                    f"({cause}); to run {world_size} processes on CPU launch with: "
                    f"{CPU_LAUNCH.format(n=world_size)}")
        return (f"accelerate joined {num_processes} processes but WORLD_SIZE says {world_size}; launch with "
                f"accelerate launch --num_processes {num_processes} (or fix WORLD_SIZE)")
    # accelerate's simple launcher (``--cpu``) runs one process; it sets MASTER_ADDR only when asked for more
    launched_more = (_flag("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ and num_processes == 1
                     and not any(name in os.environ for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                   *_MPI_SIZE_VARIABLES)))
    if launched_more:
        return ("accelerate launch --cpu starts ONE process whatever --num_processes says; to run N processes on "
                f"CPU launch with: {CPU_LAUNCH.format(n='N')} (for one process drop --num_processes, or unset "
                "MASTER_ADDR)")
    return None


def check_launch(num_processes: int) -> None:
    """Stop a mis-launched run before it writes anything.

    Raises :class:`LaunchError` naming the problem and the command to use on the process the launcher numbered
    0; the other processes exit quietly with status 1, so the user reads the explanation once.
    """
    problem = launch_problem(num_processes)
    if problem is None:
        return
    if int(os.environ.get("RANK", "0") or 0) != 0:
        raise SystemExit(1)
    raise LaunchError(f"{problem}; nothing was written")


def quiet_other_processes(is_main_process: bool) -> None:
    """Show Python warnings on the main process only: N processes would otherwise print each one N times."""
    if not is_main_process:
        warnings.simplefilter("ignore")
