"""The synthetic knowledge data make learning and forgetting measurable on a tiny model in seconds."""

import jax

from jaxcollab import data, model, train
from jaxcollab.evaluation.evaluate import evaluate_task


def test_a_tiny_model_learns_a_domain_and_fft_on_the_next_one_forgets_it():
    tokenizer = data.ByteTokenizer()
    cfg = model.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256, num_layers=4,
                            num_heads=4, num_kv_heads=2, rope_theta=10000.0)
    old, first = data.synthetic_tasks(num_rounds=1, seed=0)
    variables = {"params": model.init_params(cfg, jax.random.key(0))}

    def fit(task, variables, steps):
        pipeline = data.build_train_pipeline(task.load("train"), tokenizer, seq_len=128, batch_size=8,
                                             num_epochs=None, seed=0)
        # Cosine decay: three data orders all reach exact match 1.0 on the first domain in 250 steps
        # (a constant 3e-3 ends between 0.80 and 0.92).
        settings = train.TrainConfig(learning_rate=3e-3, schedule="cosine", warmup_steps=10, num_steps=steps,
                                     progress=False)
        trainer = train.Trainer(cfg, settings, variables, train.full_finetune_mask(variables))
        return trainer.fit(iter(pipeline))

    variables = fit(old, variables, 250)
    learned = evaluate_task(cfg, variables["params"], old, tokenizer)
    assert learned.metric == "exact_match" and learned.score >= 0.8
    assert evaluate_task(cfg, variables["params"], first, tokenizer).score <= 0.1  # not known before its round

    variables = fit(first, variables, 150)
    after_old = evaluate_task(cfg, variables["params"], old, tokenizer).score
    after_new = evaluate_task(cfg, variables["params"], first, tokenizer).score
    assert after_new >= 0.6
    assert after_old <= learned.score - 0.5  # full fine-tuning on the new domain overwrote the old one
