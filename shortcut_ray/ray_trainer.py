"""A TorchTrainer whose failure policy does not retry permanent errors (faults.PermanentError).

Train V2's DefaultFailurePolicy retries every worker error up to FailureConfig.max_failures times and
has no notion of an error that a restart cannot fix: a wrong image size, corrupt data, a diverged run
or an unreachable MLflow server at the start were retried (13.5 minutes for MLflow down). The policy
is created on the driver and handed to the controller actor, so it is replaced there.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from .faults import find_permanent


class PermanentAwarePolicy(DefaultFailurePolicy):
    def make_decision(self, training_failed_error) -> FailureDecision:
        if find_permanent(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class ShortcutTrainer(TorchTrainer):
    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = PermanentAwarePolicy(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
