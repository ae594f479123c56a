"""Fine-tuning rounds in the coordinator: the runner as small persisted steps (``runner``),
what it needs of a model space (``space``), automatic rounds (``auto``) and near-duplicate
flagging as a pure function (``copies``)."""
