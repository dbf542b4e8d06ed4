"""Epoch randomness: everything an epoch draws (the shuffle, the augmentation, dropout) comes from generators
seeded by (seed, epoch), and a checkpoint saves their states, so a resumed run repeats an uninterrupted one
exactly, even from a checkpoint written in the middle of an epoch.

NumPy's generator states are saved as they are; CuPy's cannot be read, so on a GPU each generator is a
backend.ReplayableGenerator, whose state is its seed and the draws made, which a resume replays.
"""
import numpy

from .backend import ReplayableGenerator, host_generator, random_generator
from .distributed import SINGLE_PROCESS


def epoch_seed(seed, epoch, stream):
    """A distinct integer seed per (run seed, epoch, stream): NumPy and CuPy both take plain ints."""
    return (seed * 1_000_003 + epoch * 101 + stream) % (2**63)


def dropout_seed(seed, epoch, index, rank=0, restart_step=0):
    """The seed of dropout generator `index` of an MPI rank in an epoch: epoch_seed's stream 2 + index
    on rank 0 (a single process is rank 0), and apart from every other stream on other ranks, or when
    the generators restart at step `restart_step` of the epoch (a resume under another layout)."""
    return restart_seed(epoch_seed(seed, epoch, 2 + index), rank, restart_step)


def restart_seed(base, rank=0, restart_step=0):
    """`base` itself on rank 0 at step 0, else a seed apart from every other stream: mixing the step in
    keeps a generator restarted mid-epoch from repeating the epoch's first draws."""
    if rank == 0 and restart_step == 0:
        return base
    return int(numpy.random.SeedSequence([base, rank, restart_step]).generate_state(1, dtype=numpy.uint64)[0] % 2**63)


def epoch_generator(xp, seed):
    """A device generator whose state a checkpoint can hold: NumPy's own (its bit generator's state is a
    JSON-ready dict); elsewhere (CuPy, whose generator state cannot be read or written) a
    backend.ReplayableGenerator, whose state is its seed and the draws made so far."""
    return random_generator(xp, seed) if xp is numpy else ReplayableGenerator(xp, seed)


class EpochRandomness:
    """The generators one epoch draws from: the shuffle (host), the augmentation and dropout (device).

    Under MPI the shuffle and the augmentation are the job's: every rank draws them alike, for the
    whole batch. Dropout is each rank's own: its layers draw masks for its own images, seeded apart
    by `rank` (rank 0's seeds are those of a single process). A dropout of p = 0 has no generator.

    A checkpoint's state for each device generator is NumPy's bit generator state, or on CuPy a
    ReplayableGenerator's {"replay": {seed, draws}}, so a run resumed mid-epoch continues the epoch's
    draws on either device instead of repeating its first ones."""

    def __init__(self, models, xp, seed, epoch, rank=0):
        self.xp, self.seed, self.epoch, self.rank = xp, seed, epoch, rank
        self.shuffle = host_generator(epoch_seed(seed, epoch, 0))   # on the host: the same order on CPU and GPU
        self.augmentation = epoch_generator(xp, epoch_seed(seed, epoch, 1))
        self.dropout_layers = [layer for model in models for layer in model.dropout_layers()]
        for index, layer in enumerate(self.dropout_layers):
            layer.reseed(xp, dropout_seed(seed, epoch, index, rank), epoch_generator)

    @staticmethod
    def _saved(generator):
        """A generator's state as a JSON-ready dict (None for a dropout of p = 0, which has none)."""
        if isinstance(generator, ReplayableGenerator):
            return dict(replay=generator.state())
        return generator.bit_generator.state if isinstance(generator, numpy.random.Generator) else None

    def _loaded(self, generator, state):
        """The generator that continues from `state`: `generator` itself with NumPy's state loaded, or a
        replayed one; None where `state` cannot be continued on this device (a NumPy state on CuPy, or
        None: a checkpoint written on a GPU before generator states were saved)."""
        if isinstance(state, dict) and "replay" in state:
            return ReplayableGenerator.replayed(self.xp, state["replay"])
        if isinstance(state, dict) and isinstance(generator, numpy.random.Generator):
            generator.bit_generator.state = state
            return generator
        return None

    def state(self, communicator=SINGLE_PROCESS):
        """{"generators": [the augmentation's state, then every rank's dropout generators in rank order],
        "dropout_per_rank": [how many each rank has]}; under MPI collective, and None on ranks but 0."""
        gathered = communicator.gather([self._saved(layer.generator) for layer in self.dropout_layers])
        if gathered is None:
            return None
        return dict(generators=[self._saved(self.augmentation)] + [state for states in gathered for state in states],
                    dropout_per_rank=[len(states) for states in gathered])

    def restore(self, random_state, communicator=SINGLE_PROCESS, first_step=0):
        """Continue the epoch's draws from a checkpoint's `random_state` (`state()`'s; collective under MPI).

        The augmentation is the job's and resumes under any number of ranks. The dropout generators resume
        where the checkpoint was written with the same layout (the same dropout generators on each rank:
        the same ranks and threads); under another layout they restart from seeds of their own
        (`dropout_seed` with `first_step`), since the masks an uninterrupted run draws depend on the layout
        anyway. A state this device cannot continue restarts its generator the same way. Returns a line
        for the log when that changes what is drawn, else None."""
        states = random_state["generators"]
        saved_layout = random_state.get("dropout_per_rank", [len(states) - 1])   # older checkpoints: one process
        notes = []
        augmentation = self._loaded(self.augmentation, states[0])
        if augmentation is None:
            augmentation = epoch_generator(self.xp, restart_seed(epoch_seed(self.seed, self.epoch, 1), 0, first_step))
            notes.append("augmentation")
        self.augmentation = augmentation
        layout = communicator.allgather(len(self.dropout_layers))
        same_layout = layout == saved_layout
        first = 1 + sum(layout[:communicator.rank])
        for index, layer in enumerate(self.dropout_layers):
            if layer.generator is None:                 # p = 0: nothing drawn, nothing to continue
                continue
            generator = self._loaded(layer.generator, states[first + index]) if same_layout else None
            if generator is None:
                layer.reseed(self.xp, dropout_seed(self.seed, self.epoch, index, communicator.rank, first_step),
                             epoch_generator)
                if same_layout and "dropout" not in notes:
                    notes.append("dropout")
            else:
                layer.use_generator(self.xp, generator)
        if not same_layout and any(layer.p > 0 for layer in self.dropout_layers):
            return (f"the checkpoint was written mid-epoch with {saved_layout} dropout generators per rank, this run "
                    f"has {layout} (other ranks or --threads): the rest of epoch {self.epoch + 1} draws its dropout "
                    f"masks from new seeds")
        if notes:
            return (f"the checkpoint holds no {' or '.join(notes)} generator state this device can continue (written "
                    f"on another device, or on a GPU by an older version): the rest of epoch {self.epoch + 1} draws "
                    f"its {' and '.join(notes)} from new seeds")
        return None
