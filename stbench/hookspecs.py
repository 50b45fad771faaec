"""Hook specifications: the whole plugin API of stbench.

Every hook receives a ``register`` callable and calls it once per item it contributes. Built-in and
third-party plugins go through the same hooks. Hooks are called one plugin at a time (see
:mod:`stbench.plugins`) so an error always names the plugin that raised it, and a name registered twice
is an error naming both plugins.
"""

import pluggy

hookspec = pluggy.HookspecMarker("stbench")


@hookspec
def stbench_register_methods(register):
    """Register methods and baselines.

    Called once per plugin when the plugin manager loads. Call ``register(spec)`` with a
    :class:`stbench.specs.MethodSpec` for each method. Return value ignored.
    """


@hookspec
def stbench_register_datasets(register):
    """Register datasets.

    Called once per plugin at load. Call ``register(spec)`` with a
    :class:`stbench.specs.DatasetSpec` for each dataset. Return value ignored.
    """


@hookspec
def stbench_register_splits(register):
    """Register split protocols.

    Called once per plugin at load. Call ``register(spec)`` with a
    :class:`stbench.specs.SplitSpec` for each protocol. Return value ignored.
    """


@hookspec
def stbench_register_metrics(register):
    """Register metrics.

    Called once per plugin at load. Call ``register(spec)`` with a
    :class:`stbench.specs.MetricSpec` for each metric. Return value ignored.
    """


@hookspec
def stbench_register_prompts(register):
    """Register prompt (measured-spot) selection strategies.

    Called once per plugin at load. Call ``register(spec)`` with a
    :class:`stbench.specs.PromptSpec` for each strategy. Return value ignored.
    """


@hookspec
def stbench_register_encoders(register):
    """Register image encoders (patch → feature vector).

    Called once per plugin at load. Call ``register(spec)`` with a
    :class:`stbench.specs.EncoderSpec` for each encoder. Return value ignored.
    """
