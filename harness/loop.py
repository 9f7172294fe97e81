"""
What the machinery adds to a training loop (train.train_sft, train.train_preference): the loop calls these
hooks and nothing else of the machinery. train.OneProcess: the same hooks for one process that keeps nothing.

- start: the model compiled with --compile and wrapped for DDP under torchrun (SFT), and, when the same
  command was killed, what its last resume state saved (weights, optimizer, step, random states, data order).
- end_step: a non-finite loss stops the run; every --checkpoint_interval steps a resume state NAME.resume.pt.
- the torchrun helpers (distributed.py): each process's part of a batch, gradients and metrics over processes.
"""

from harness import distributed
from harness.checks import check_finite
from model import compile_model


class Hooks:
    def __init__(self, run, name):
        """run: the Run that owns out_dir; name: the checkpoint the loop makes (sft.pt, dpo.pt, ...)."""
        self._run, self._checkpoint = run, name  # underscored: the code walk meets .run and .name elsewhere
        self.world, self.is_main = distributed.world_size(), distributed.is_main()

    def start_loop(self, model, optimizer, generator, rows=None):
        """(the model the loop runs, the step to start from, the state saved with it). rows: the rows of one
        forward pass, for a model to compile and wrap (none: the model runs as it is)."""
        running = model
        if rows is not None:
            s = self._run.s
            if s.compile:
                running = compile_model(model, (rows, s.block_size), s.device, s.dtype)
            running = distributed.wrap(running, s.device)
        start, state = self._run.resume(self._checkpoint, model, optimizer, generator)
        return running, start, state

    def end_step(self, step, loss, model, optimizer, generator, **state):
        """After step `step` (counted from 0): stop on a non-finite loss; every --checkpoint_interval steps,
        save everything the loop needs to go on (state: its data position, its logs)."""
        stage = self._checkpoint.split("_seed")[0].removesuffix(".pt")  # dpo_seed1338.pt: dpo
        check_finite(loss, stage, step)
        self._run.save_resume_state(self._checkpoint, step, model, optimizer, generator, **state)

    def micro_batches(self, model, x, y, grad_accum):
        return distributed.micro_batches(model, x, y, grad_accum)

    def process_part(self, items):
        return distributed.split(items)

    def average_gradients(self, model):
        distributed.average_gradients(model)

    def sum_over_processes(self, value):
        return distributed.sum_over_processes(value)

    def mean_over_processes(self, row):
        return distributed.mean_over_processes(row)
