"""The tasks a program can be exported for, and the label value the loss ignores."""

CAUSAL_LM = "causal-lm"
SEQ_CLS = "seq-cls"
TASKS = (CAUSAL_LM, SEQ_CLS)
IGNORE_INDEX = -100
