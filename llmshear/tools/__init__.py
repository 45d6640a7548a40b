"""The offline tools around a run: the resource planner, export and model card, evaluation (perplexity and
downstream tasks with their local task files) and the demo corpus. The training path (``llmshear/*.py`` and its
subpackages but this one) never imports them."""
