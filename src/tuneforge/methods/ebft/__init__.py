"""EBFT (`rl: ebft`): energy-based fine-tuning by feature matching (docs/ebft.md).

`features` extracts and pools the frozen feature network's hidden states, `reward` turns features into
the rewards of eq. 7; the structured mode is GRPO with that reward, the strided mode its own objective.
"""
