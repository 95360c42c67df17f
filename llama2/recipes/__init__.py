"""One recipe per stage of the paper, each a `main(cfg)` that reads top to bottom.

    pretrain.py             §2    pretraining on packed token shards
    sft.py                  §3.1  supervised fine-tuning (assistant-only loss, packed dialogs)
    reward_model.py         §3.2.2 helpfulness and safety reward models
    rejection_sampling.py   §3.2.3 best-of-K fine-tuning
    ppo.py                  §3.2.3 PPO with the safety-gated reward
    ghost_attention.py      §3.3  GAtt data and fine-tuning
    safety_distillation.py  §4.2.4 context distillation
    evaluate.py             §3.4, §4.4 win rates, violation and false-refusal rates
    pipeline.py             the whole loop, RLHF-V1 … Vn
"""
