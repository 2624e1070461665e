"""Two-armed bandit with symbolic arm names (RAGEN's Bi-Arm Bandit)."""

from __future__ import annotations

import random

from .base import Env, StepResult

# (low-risk arm, high-risk arm). The high-risk / high-reward arm is always the name that
# suggests boldness or danger, so a model can learn the mapping from world knowledge; the
# test split uses disjoint names to measure whether that generalises beyond memorisation.
TRAIN_PAIRS: tuple[tuple[str, str], ...] = (
    ("Phoenix", "Dragon"),
    ("Tortoise", "Tiger"),
    ("Banker", "Gambler"),
    ("Harbor", "Storm"),
    ("Monk", "Pirate"),
    ("Blanket", "Firework"),
    ("Shield", "Sword"),
)
TEST_PAIRS: tuple[tuple[str, str], ...] = (
    ("Accountant", "Stuntman"),
    ("Snail", "Cheetah"),
    ("Umbrella", "Lightning"),
    ("Savings", "Lottery"),
    ("Lighthouse", "Whirlpool"),
)
# Format-only names for a warm start that teaches answering with one of the two shown names, whatever
# they are: ordinary nouns and made-up words, disjoint from both splits and with no safe/risky meaning
# (the pairing is arbitrary, so use it with random demonstrations, `sft.epsilon 1`). Demonstrations on
# the seven training pairs alone teach the model those names: on held-out names it then invents names.
_FORMAT_NAMES = (
    "Apple Bridge Cotton Garden Pencil Window Marble Ladder Basket Mirror Violin Carpet Meadow Kettle "
    "Button Feather Lantern Saddle Pillow Orchard Compass Thimble Harvest Pebble Chimney Ribbon Teapot "
    "Blossom Walnut Cabinet Quartz Falcon Cedar Velvet Anchor Glacier Copper Raven Bamboo Magnet Prairie "
    "Otter Granite Canyon Maple Beacon Sparrow Lemon Hammock Tulip Willow Badger Pepper Cobalt Juniper "
    "Parrot Biscuit Ember Thistle Cricket Tundra Oyster Sapphire Almond Heron Olive Puzzle Garnet Walrus "
    "Nutmeg Crystal Dolphin Saffron Coral Lynx Zorvan Kelmira Taviq Brondel Quillon Mirabo Sennet Yarrow "
    "Dunmore Felsk Ombrin Paxley Rudwin Talloway Vessik Wrenfield Ixora Caldus Norrin Pellam Quenby Astrel"
).split()
FORMAT_PAIRS: tuple[tuple[str, str], ...] = tuple(zip(_FORMAT_NAMES[0::2], _FORMAT_NAMES[1::2]))
SPLITS = {"train": TRAIN_PAIRS, "test": TEST_PAIRS, "format": FORMAT_PAIRS}


class BanditEnv(Env):
    """Two-armed bandit: pick the safe arm or the risky high-paying arm, one pull per episode.

    RAGEN's Bi-Arm Bandit. Each name pair is (safe, risky); the risky arm is always the name
    suggesting boldness or danger (Dragon, Tiger, Gambler, Storm, Pirate, Firework, Sword; test
    split: Stuntman, Cheetah, Lightning, Lottery, Whirlpool). Train and test names are
    disjoint, so `bandit_test` measures whether "bold name = risky arm" generalises.

    Observation:
        "You are facing two slot machines: {a} and {b}. Pull one arm." The two names come
        from one (safe, risky) pair of the split; which is shown first is random.
    Actions:
        One of the two arm names of this episode (case-insensitive); see
        `available_actions()`.
    Rewards:
        Safe arm: `lo_reward` (0.15) always. Risky arm: `hi_reward` (1.0) with probability
        `hi_prob` (0.25), else 0.0, so the risky arm's mean 0.25 beats 0.15.
        `info["success"]` is True when the risky arm was pulled.
    Episode end:
        Terminated after the first valid pull; the observation becomes "{arm}: {reward} points".
    Arguments:
        split: "train" or "test" (disjoint name pairs), or "format": many neutral pairs (ordinary nouns and
            made-up words, arbitrary safe/risky roles) for format-only warm starts. lo_reward, hi_reward,
            hi_prob: payouts.
        pairs: optional list of (safe_name, risky_name) tuples replacing the split's list.
    """

    name = "bandit"
    action_names = None  # names change per episode, see available_actions()

    def __init__(
        self,
        split: str = "train",
        lo_reward: float = 0.15,
        hi_reward: float = 1.0,
        hi_prob: float = 0.25,
        pairs: list[tuple[str, str]] | None = None,
    ) -> None:
        if pairs is None:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
            pairs = list(SPLITS[split])
        self.pairs = [self._validate_pair(p) for p in pairs]
        if not self.pairs:
            raise ValueError("pairs must contain at least one (safe, risky) pair")
        if not 0.0 <= hi_prob <= 1.0:
            raise ValueError(f"hi_prob must be in [0, 1], got {hi_prob}")
        self.split = split
        self.lo_reward = float(lo_reward)
        self.hi_reward = float(hi_reward)
        self.hi_prob = float(hi_prob)
        self._lo = self._hi = ""
        self._shown: tuple[str, str] | None = None
        self._pulled: str | None = None
        self._last_reward = 0.0
        self._rng = random.Random(0)

    @staticmethod
    def _validate_pair(pair: tuple[str, str]) -> tuple[str, str]:
        if len(pair) != 2 or not all(isinstance(n, str) and n.strip() for n in pair):
            raise ValueError(f"each pair must be two non-empty names, got {pair!r}")
        lo, hi = (n.strip() for n in pair)
        if lo.lower() == hi.lower():  # matching is case-insensitive, so names must differ that way
            raise ValueError(f"arm names in a pair must differ, got {pair!r}")
        return lo, hi

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self._rng = random.Random(self._next_episode_seed(seed))
        self._lo, self._hi = self._rng.choice(self.pairs)
        # Randomise the order so "always pick the second arm" is not a shortcut.
        self._shown = (self._lo, self._hi) if self._rng.random() < 0.5 else (self._hi, self._lo)
        self._pulled = None
        self._last_reward = 0.0
        return self.render(), {"arms": list(self._shown), "hi_arm": self._hi}

    def available_actions(self) -> list[str]:
        return list(self._shown) if self._shown else []

    def step(self, action: str) -> StepResult:
        self._require_reset()
        if self._pulled is not None:
            return self._after_done_step(True, False, self._pulled == self._hi)
        arm = self._match_action(action)
        if arm is None:
            return self._invalid_step(action)
        if arm == self._hi:
            reward = self.hi_reward if self._rng.random() < self.hi_prob else 0.0
        else:
            reward = self.lo_reward
        self._pulled, self._last_reward = arm, reward
        info = {"success": arm == self._hi, "action_valid": True, "action_effective": True, "arm": arm}
        return StepResult(self.render(), reward, True, False, info)

    def render(self) -> str:
        self._require_reset()
        if self._pulled is not None:
            return f"{self._pulled}: {self._last_reward:g} points"
        a, b = self._shown
        return f"You are facing two slot machines: {a} and {b}. Pull one arm."

    def system_prompt(self) -> str:
        return (
            "You are playing a bandit game with two slot machines (arms), each with a name.\n"
            "Each arm has its own reward distribution: one pays a small reward every time, "
            "the other pays a large reward only sometimes. Your goal is to maximise the "
            "expected reward. You pull exactly one arm, then the game ends.\n"
            "Answer with the name of the arm you pull inside <answer>...</answer>, "
            "e.g. <answer>ArmName</answer>."
        )

    def expert_action(self) -> str:
        # The risky arm has the higher mean (0.25 > 0.15 with the defaults).
        self._require_reset()
        risky_mean = self.hi_reward * self.hi_prob
        return self._hi if risky_mean >= self.lo_reward else self._lo

    def _require_reset(self) -> None:
        if self._shown is None:
            raise RuntimeError("call reset() before using the environment")
