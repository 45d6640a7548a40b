"""``train.py`` whose checkpoint write of one batch stalls, so a test can SIGKILL the run inside the write.

    python tests/stall_worker.py BATCH MODE MARKER RECIPE.yaml [key=value ...]

MODE ``empty`` stalls with the file created and empty, ``partial`` with half of it written, ``complete`` with
all of it written but ``latest-rank0.pt`` not yet moved; ``sharded`` stalls a sharded checkpoint with every
rank's shard written but not its ``.metadata``; ``upload`` stalls rank 1's upload of its shard of that batch's
sharded checkpoint to ``checkpoint.remote`` (the background upload; training goes on). ``MARKER`` is created once
the stall begins. Also runs under ``composer -n 2``.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import composer.utils.checkpoint as composer_checkpoint
import torch
from torch.distributed.checkpoint import filesystem


def stalling_writer(batch: int, mode: str, marker: Path):
    write = composer_checkpoint._write_checkpoint_file

    def stalled(state_dict: dict, filename: str) -> None:
        if f"-ba{batch}-" not in Path(filename).name:
            return write(state_dict, filename)
        if mode == "complete":
            write(state_dict, filename)
        else:
            buffer = io.BytesIO()
            torch.save(state_dict, buffer)
            data = buffer.getvalue()
            with open(filename, "wb") as handle:
                handle.write(data[: len(data) // 2] if mode == "partial" else b"")
        marker.touch()
        time.sleep(3600)

    return stalled


def stalling_finish(batch: int, marker: Path):
    finish = filesystem.FileSystemWriter.finish

    def stalled(self, metadata, results) -> None:
        if not str(self.path).endswith(f"-ba{batch}"):
            return finish(self, metadata, results)
        marker.touch()
        time.sleep(3600)

    return stalled


def stalling_upload(batch: int, marker: Path):
    from llmshear import remote

    upload = remote.Remote.upload

    def stalled(self, path: Path, name: str) -> None:
        if name.startswith(f"ep0-ba{batch}/__1_"):
            marker.touch()
            time.sleep(3600)
        return upload(self, path, name)

    return stalled


if __name__ == "__main__":
    batch, mode, marker, *args = sys.argv[1:]
    if mode == "upload":
        from llmshear import remote

        remote.Remote.upload = stalling_upload(int(batch), Path(marker))
    elif mode == "sharded":
        filesystem.FileSystemWriter.finish = stalling_finish(int(batch), Path(marker))
    else:
        composer_checkpoint._write_checkpoint_file = stalling_writer(int(batch), mode, Path(marker))
    from llmshear.run import main

    sys.exit(main(args))
