"""CSR inside OpenRLHF, one module per thing OpenRLHF loads or runs.

- agent.py: the agent executor vLLM rollout workers load (``--train.agent_func_path``);
- reward_func.py: the reward file OpenRLHF loads (``--reward.remote_url path.py``);
- reward_server.py: the same reward over HTTP (``--reward.remote_url http://...``, `csr serve-reward`);
- plain_rollout.py: one candidate, one beam: a plain rollout, split into sentences and scored afterwards;
- step_reward.py: PPO's step reward (sentence rewards centred on the prompt group's mean) and its checks;
- dense_rewards.py: the patch that turns per-sentence rewards into OpenRLHF's per-token rewards;
- ppo_on_cpu.py: what OpenRLHF's PPO needs changed to run without CUDA (strategy, vLLM actors, weight sync);
- ppo.py, cli_args.py, env_recipe.py: the `csr train-ppo` launcher and how the recipe reaches the workers.
"""
from pathlib import Path

AGENT_FILE = Path(__file__).with_name("agent.py")
