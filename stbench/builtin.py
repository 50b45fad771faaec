"""The core's own plugin: split protocols, metrics and prompt strategies.

Registered through the same hooks as every other plugin, so ``stbench list`` shows them with their
provenance and a third party can add more the same way.
"""

from stbench import hookimpl


@hookimpl
def stbench_register_splits(register):
    from stbench.splits import builtin_split_specs

    for spec in builtin_split_specs():
        register(spec)


@hookimpl
def stbench_register_metrics(register):
    from stbench.metrics import builtin_metric_specs

    for spec in builtin_metric_specs():
        register(spec)


@hookimpl
def stbench_register_prompts(register):
    from stbench.prompts import builtin_prompt_specs

    for spec in builtin_prompt_specs():
        register(spec)
