"""Sudden loss: survive a peer rank that dies without warning.

A rank killed by SIGKILL, its node gone or its GPU off the bus gives no warning, but in data-parallel
training its parameters and optimizer state live on in its replicas. The pieces, each with its own
state and a small interface:

- `_channel`: the side channel, the launcher's TCPStore, which outlives every worker.
- `_watch`: heartbeats and a ring of watchers; one alarm for every rank.
- `_abandon` (with `_procfs`): every collective of the survivors made to fail at once (NCCL abort;
  gloo's sockets shut down), so no survivor waits out a 10- or 30-minute timeout.
- `_records`: each rank's small per-rank state (RNGs, data position) at every completed step,
  mirrored on the side channel; `_buffers`: module buffers as at the last completed step.
- `_plan` and `_agree`: the survivors agree, without the dead rank, on the last step every rank
  completed and who writes which rank's files — or say in one line why they cannot.
- `sudden`: `SuddenLoss`, the part the guard drives.
"""

from gpuguard.peers.sudden import SuddenLoss, SurvivorOutcome

__all__ = ["SuddenLoss", "SurvivorOutcome"]
