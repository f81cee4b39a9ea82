"""The RLHF maths as a library: pure functions and small classes on tensors, no plugin
state. One job per module:

* :mod:`~rlhfkit.rlhf.masked`: masked sum, mean, variance and whitening; the data-parallel
  denominator that makes per-rank means add up to the global mean.
* :mod:`~rlhfkit.rlhf.logprobs`: logprobs and entropies from logits; the policy's logprobs of
  response tokens with the LM head in fp32.
* :mod:`~rlhfkit.rlhf.fused`: logprobs of chosen tokens straight from hidden states, chunk by
  chunk, without keeping a (tokens, vocab) logits tensor.
* :mod:`~rlhfkit.rlhf.advantages`: generalised advantage estimation.
* :mod:`~rlhfkit.rlhf.kl`: the per-token KL penalty and the fixed and adaptive KL controllers.
* :mod:`~rlhfkit.rlhf.schedule`: learning-rate schedules.
* :mod:`~rlhfkit.rlhf.minibatch`: how an RL step's prompts split into per-rank minibatches.
* :mod:`~rlhfkit.rlhf.losses`: the reward-model losses (pairwise, K-wise) and the SFT loss.
* :mod:`~rlhfkit.rlhf.tokenize`: prompts and prompt + response pairs to padded tensors.
* :mod:`~rlhfkit.rlhf.packing`: several sequences per row with a block-diagonal mask.
* :mod:`~rlhfkit.rlhf.sampling`: batched sampling with a KV cache into a rollout.
* :mod:`~rlhfkit.rlhf.retokenize`: reward models with their own tokenizer.
* :mod:`~rlhfkit.rlhf.rollout`: sample, then score with the policy, the reference, the
  reward model and a critic, into an experience batch.
* :mod:`~rlhfkit.rlhf.dropout`: dropout off for RL.
* :mod:`~rlhfkit.rlhf.memory`: activation checkpointing.
* :mod:`~rlhfkit.rlhf.evaluation`: held-out gold, proxy, KL and win rate of a policy.

Nothing is re-exported here: import from the module.
"""
