"""One recipe per stage of the paper, each a `main(cfg)` that reads top to bottom.

    pretrain.py             §2     pretraining on packed token shards
    sft.py                  §3.1   supervised fine-tuning (assistant-only loss, packed dialogs)
    annotate.py             §3.2.1 a weekly preference batch, judged by the built-in world's annotators
    reward_model.py         §3.2.2 helpfulness and safety reward models
    best_of_n.py            §3.2.3 best-of-N curves and the temperature sweep (Figures 7, 8)
    rejection_sampling.py   §3.2.3 best-of-K fine-tuning
    ppo.py                  §3.2.3 PPO with the safety-gated reward
    evaluate.py             §3.4, §4.4 win rates, violation and false-refusal rates

The whole loop over these stages (RLHF-V1 … Vn) is llama2/pipeline.py.
"""
