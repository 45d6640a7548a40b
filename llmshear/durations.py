"""Durations as Composer writes them (``3200ba``, ``13107200tok``, ``128sp``) → whole batches.

The run counts in batches (the L0 schedule, warm-up and hardening are fractions of ``train.max_batches``), so
every duration a recipe writes as a string is converted once, when the config is loaded: tokens through
``global_batch_size × seq_len`` per batch, samples through ``global_batch_size``. A conversion that is not a
whole number of batches is refused, and so are epochs: the dynamic-loading stream has no epochs (a domain that
runs out starts a new pass of its own).
"""

from __future__ import annotations

# (dotted key, section attribute holding it, attribute the batches go to)
DURATION_KEYS = (
    ("train.max_duration", "train", "max_duration", "max_batches"),
    ("train.eval_interval", "train", "eval_interval", "eval_interval"),
    ("train.log_interval", "train", "log_interval", "log_interval"),
    ("scheduler.warmup", "scheduler", "warmup", "warmup"),
    ("checkpoint.save_interval", "checkpoint", "save_interval", "save_interval"),
)


def to_batches(text: str, key: str, global_batch_size: int, seq_len: int) -> int:
    """Whole batches in a duration string.

    Raises:
        ValueError: naming ``key``: not a duration, in epochs or ``dur``, or not a whole number of batches.
    """
    from composer.core import Time, TimeUnit  # Composer's own parser, loaded only for a recipe that writes one

    try:
        time = Time.from_timestring(text.strip())
    except (ValueError, TypeError) as err:
        raise ValueError(f"{key}={text!r} is not a duration (write e.g. 3200ba, 13107200tok or 128sp)") from err
    per_batch = {TimeUnit.BATCH: 1, TimeUnit.SAMPLE: global_batch_size, TimeUnit.TOKEN: global_batch_size * seq_len}
    if time.unit not in per_batch:
        raise ValueError(f"{key}={text!r}: {time.unit.value!r} is not supported; use ba (batches), tok (tokens) or sp "
                         f"(samples): the dynamic-loading stream has no epochs")
    count, size, unit = time.value, per_batch[time.unit], time.unit.value
    if count % size:
        nearest = [n for n in (count // size, count // size + 1) if n > 0]
        raise ValueError(f"{key}={text!r} is not a whole number of batches of {size} {unit} "
                         f"(train.global_batch_size={global_batch_size}, data.seq_len={seq_len}); the nearest: "
                         + " or ".join(f"{n * size}{unit} ({n}ba)" for n in nearest))
    return count // size


def resolve_durations(cfg) -> list[str]:
    """Replace every duration string of ``cfg`` by its whole batches (``train.max_duration`` fills
    ``train.max_batches``); the problems, each naming its key. A value that fails stays a string."""
    t = cfg.train
    problems = []
    if (t.max_batches is None) == (t.max_duration is None):
        problems.append("train.max_batches / train.max_duration: set exactly one of them")
    if isinstance(t.max_duration, int) and not isinstance(t.max_duration, bool):
        problems.append(f"train.max_duration={t.max_duration}: write the unit ({t.max_duration}ba); a bare number is "
                        f"epochs to Composer, and the dynamic-loading stream has none (or use train.max_batches)")
        return problems
    if not isinstance(t.global_batch_size, int) or not isinstance(cfg.data.seq_len, int):
        return problems  # mistyped, already reported
    for key, section, name, target in DURATION_KEYS:
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str):
            try:
                setattr(getattr(cfg, section), target, to_batches(value, key, t.global_batch_size, cfg.data.seq_len))
            except ValueError as err:
                problems.append(str(err))
    return problems
