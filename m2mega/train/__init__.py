"""Training: the config (:mod:`.config`), model families and data sources (:mod:`.families`), megatron-core
optimizer/schedule/DDP (:mod:`.optim`), checkpoints (:mod:`.checkpoint`), the :class:`~.loop.Trainer` with
its one ``fit(step_source)`` loop (:mod:`.loop`), and the two step sources with their command lines: SFT
(:mod:`.sft`) and GRPO (:mod:`.grpo`, the update in :mod:`.grpo_update`; rollouts and rewards in
:mod:`m2mega.rl`)."""
