"""TextArena's games (LeonGuertler/TextArena: 100+ single- and multi-player text games) as turnrl envs.

    env = make("textarena", game="TicTacToe-v0", opponent="random")

The policy plays one seat (`player`); the other seats are played by an opponent: a turnrl solver ("solver"), a
random legal move ("random"), your own callable ("pkg.mod:fn", given each turn TextArena's usual text for its
seat), or a chat model behind an OpenAI-compatible server (`opponent_url`; with `opponent_prompt="agent"` and
`turnrl serve` of an earlier checkpoint, a frozen copy of the policy). Both seats are not trained at once: the
policy learns from its own seat only. The package is optional (`pip install 'turnrl[textarena]'`) and
imported when the env is built.

Two things make TextArena's games behave as the turnrl contract asks (docs/envs.md):
- TextArena's games draw from Python's global `random` (and some from numpy's), seeded by `reset(seed)`. Here each
  env keeps its own generator states and swaps them in around every call into the game, under one lock, so
  episodes played side by side (a rollout, `rollout.env_threads`) do not disturb each other and a seed always
  plays the same game.
- TextArena ends a game after a player's second invalid move in a row (a loss). With `invalid_moves="retry"`
  (default) the policy's invalid moves are answered with the game's reason and cost nothing, as in every turnrl
  env; `invalid_moves="textarena"` keeps TextArena's rule (closer to its leaderboard; then `check_env`'s
  garbage test does not apply). Opponents always play under TextArena's rule.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import pathlib
import random
import re
import threading
from typing import Any, Callable

from .base import Env, StepResult
from .tarena_solvers import SOLVERS, Solver

_GLOBAL_RNG = threading.Lock()  # TextArena's games use the process-wide generators: one game call at a time
_MAX_OPPONENT_MOVES = 1000  # an opponent that never hands the turn back (it cannot end its own game) is a bug
GAME_ID = -1  # TextArena's sender id of game messages
_RENDER_LINES = 20  # render() of a game without board messages: its newest messages to the policy's seat
OPPONENT_SYSTEM = ("You are a competitive game player. Make sure you read the game instructions carefully, and "
                   "always follow the required format.")  # TextArena's own prompt for its LLM agents


def _textarena():
    try:
        import textarena
    except ImportError as err:
        raise ValueError("env textarena needs the textarena package: pip install 'turnrl[textarena]' "
                         f"({err})") from None
    return textarena


class _OwnRandom:
    """The episode's own states of `random` (and of numpy's global generator, for games that draw from it), swapped
    in around a call into the game: ~20 us per call, ~170 us with numpy's (measured on this 2-core VM)."""

    def __init__(self, seed: int, numpy: bool = False) -> None:
        self.py = random.Random(seed).getstate()
        self._np = None
        if numpy:
            import numpy as np

            self._np = np
            self.numpy = np.random.RandomState(seed % 2**32).get_state()

    def __enter__(self) -> "_OwnRandom":
        _GLOBAL_RNG.acquire()
        self._saved = random.getstate()
        random.setstate(self.py)
        if self._np is not None:
            self._saved_np = self._np.random.get_state()
            self._np.random.set_state(self.numpy)
        return self

    def __exit__(self, *exc) -> None:
        self.py = random.getstate()
        random.setstate(self._saved)
        if self._np is not None:
            self.numpy = self._np.random.get_state()
            self._np.random.set_state(self._saved_np)
        _GLOBAL_RNG.release()


@functools.lru_cache(maxsize=None)
def _uses_numpy_random(cls: type) -> bool:
    """Whether the game's package draws from numpy's global generator (a few of TextArena 0.7.4's games do, e.g.
    Sokoban-v0's room generator)."""
    folder = pathlib.Path(inspect.getfile(cls)).parent
    return any("np.random" in f.read_text(errors="ignore") or "numpy.random" in f.read_text(errors="ignore")
               for f in folder.rglob("*.py"))


_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)


def _bracketed(move: str) -> str:
    """A move in TextArena's syntax: bracketed when it has no brackets (TextArena's ActionFormattingWrapper)."""
    move = move.strip()
    return move if "[" in move or "]" in move else f"[{move}]"


def _nltk_hint(game: str, err: LookupError) -> str:
    missing = next((line.strip() for line in str(err).splitlines() if "not found" in line), "a resource is missing")
    return (f"TextArena game {game!r} needs NLTK data that could not be downloaded ({missing}): run "
            "`python -m nltk.downloader words` (and what else it names) where there is network, or set NLTK_DATA")


def _load_callable(path: str) -> Callable[[str], str]:
    module, _, attr = path.partition(":")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"opponent {path!r}: cannot import it ({err}); give 'package.module:function'") from None
    target = target() if isinstance(target, type) else target  # a TextArena Agent class: an instance of it
    if not callable(target):
        raise ValueError(f"opponent {path!r} is not callable")
    return target


class _ServedOpponent:
    """A chat model behind an OpenAI-compatible server, asked once per move (turnrl.engines.openai's client)."""

    _engines: dict[tuple[str, str], Any] = {}  # one client per server and model for all envs of the process

    def __init__(self, url: str, model: str, max_tokens: int) -> None:
        from turnrl.engines.base import SamplingParams
        from turnrl.engines.openai import OpenAIEngine, ServerError

        key = (url, model)
        if key not in self._engines:  # checked once per process: an unreachable server fails here, not mid-game
            try:
                engine = OpenAIEngine(url, model or None, timeout=120.0, max_retries=2, concurrency=1)
                served = engine.served_models()
            except ServerError as err:
                raise ValueError(f"opponent_url {url}: {err}") from None
            if model and model not in served:
                raise ValueError(f"the opponent server {url} does not serve {model!r} (it serves: "
                                 f"{', '.join(served[:5]) or 'nothing'}); set opponent_model")
            self._engines[key] = engine
        self.engine = self._engines[key]
        self.params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, greedy=True)

    def __call__(self, messages: list[dict]) -> str:
        return self.engine.chat([messages], self.params)[0].text or ""


class TextArenaEnv(Env):
    """A TextArena game, the policy in one seat, an opponent in the others (1 to N players).

    Observation:
        TextArena's messages to the policy's seat since its last move, one per line as TextArena's LLM wrapper
        writes them: `[GAME] ...` for the game (the rules first, then boards, results of moves, reasons for
        invalid moves) and `[Player 1] ...` for what another seat played. At the end, `[GAME] Game over: <reason>`.
        With observe="board", the rules (first turn), the reason for a refused move and the newest board message
        alone (TextArena's GAME_BOARD; for games whose board is their whole state, e.g. TicTacToe's, which lists
        the free cells): later turns' prompts a quarter as long, for small models. Games that send no board
        message keep all their messages.
    Actions:
        One move as free text in the game's bracket syntax, e.g. `[4]` (TicTacToe), `[A C]` (Tower of Hanoi),
        `[1 2 3 4]` (Mastermind). A move without brackets is bracketed (TextArena's ActionFormattingWrapper), so
        `<answer>4</answer>` plays `[4]`. Invalid moves (the game says why) leave the game as it was.
    Rewards:
        TextArena's, on the final step: two-player games +1 win, 0 draw, -1 loss; single-player games 1 when
        solved, else the game's partial credit in [0, 1) (e.g. the share of disks on the target peg).
        Success: a win (multi-player: the policy's reward is the highest and above the lowest; single-player:
        reward 1). `info["metrics"]` (from reset on, every step): `invalid_moves` (so far) and, in multi-player
        games, `win`, `draw`, `loss` (0 until the game ends; a game the rollout cuts short is none of them).
    Episode end:
        Terminated when TextArena ends the game (its own turn limits included).
    Arguments:
        game: a TextArena env id ("GuessTheNumber-v0"; `textarena.envs.registration.ENV_REGISTRY` lists ~700
        variants of ~100 games), any other keyword is the game's own argument (e.g. num_disks=4).
        player (0): the policy's seat. num_players: the number of seats (default: the fewest the game accepts).
        opponent: who plays the other seats: "random" (a uniformly random legal move; the default), "solver" (the
        best move), "pkg.mod:fn" (a callable or TextArena Agent class: given TextArena's full text for its seat,
        returns a move), or set opponent_url (+ opponent_model) for a chat model behind an OpenAI-compatible
        server. "random" and "solver" need a turnrl solver for the game. opponent_prompt: what a served opponent
        is sent: "textarena" (TextArena's agent prompt and its full text for the seat) or "agent" (the chat a
        turnrl agent sees in this env: the seat's system prompt, its observations and its own earlier replies,
        `observe` applied; its move is read from `<answer>...</answer>`), so that `turnrl serve` of an earlier
        checkpoint plays as it was trained (with env.system_prompt on and rollout.context full): a frozen copy
        of the policy as the opponent. invalid_moves ("retry" or "textarena"),
        observe ("messages" or "board"), max_action_chars (1000), opponent_max_tokens (256).
        The solver (expert_action, the built-in opponents) covers GuessTheNumber, TowerOfHanoi, LightsOut,
        FrozenLake, Mastermind (single-player), TicTacToe, Nim and ConnectFour (two-player; a 3-ply search, ~10
        ms a move); other games train and evaluate without SFT demonstrations. Word games need NLTK corpora, which TextArena downloads on first use.
    """

    name = "textarena"
    free_text = True

    def __init__(self, game: str = "GuessTheNumber-v0", player: int = 0, num_players: int | None = None,
                 opponent: str = "", opponent_url: str = "", opponent_model: str = "",
                 opponent_prompt: str = "textarena", invalid_moves: str = "retry", observe: str = "messages",
                 max_action_chars: int = 1000, opponent_max_tokens: int = 256, **game_kwargs: Any) -> None:
        self._kinds = _textarena().ObservationType  # TextArena's message types
        specs = importlib.import_module("textarena.envs.registration").ENV_REGISTRY
        if game not in specs:
            close = difflib.get_close_matches(game, specs, n=1)
            raise ValueError(f"unknown TextArena game {game!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                             + " (textarena.envs.registration.ENV_REGISTRY lists them)")
        if invalid_moves not in ("retry", "textarena"):
            raise ValueError(f"invalid_moves must be 'retry' or 'textarena', got {invalid_moves!r}")
        if observe not in ("messages", "board"):
            raise ValueError(f"observe must be 'messages' or 'board', got {observe!r}")
        spec = specs[game]
        cls = spec.entry_point
        if isinstance(cls, str):
            module, _, attr = cls.partition(":")
            try:
                cls = getattr(importlib.import_module(module), attr)
            except (ImportError, SyntaxError, AttributeError) as err:  # e.g. 3.12-only f-strings in a game's code
                raise ValueError(f"TextArena game {game!r} cannot be loaded here: {type(err).__name__}: {err}") \
                    from None
            except LookupError as err:  # word games load NLTK corpora when imported
                raise ValueError(_nltk_hint(game, err)) from None
        try:
            self._make_game = functools.partial(cls, **{**spec.kwargs, **game_kwargs})
            self._game = self._make_game()
        except TypeError as err:
            raise ValueError(f"TextArena game {game!r} rejected its arguments {game_kwargs}: {err}") from None
        except LookupError as err:
            raise ValueError(_nltk_hint(game, err)) from None
        self.game, self.invalid_moves, self.observe = game, invalid_moves, observe
        self.max_action_chars = int(max_action_chars)
        factory = SOLVERS.get(cls.__name__)
        self.solver: Solver | None = factory() if factory else None
        self.num_players = int(num_players) if num_players is not None else self._fewest_players()
        if not 0 <= int(player) < self.num_players:
            raise ValueError(f"player must be a seat of the {self.num_players}-player game {game!r}, got {player}")
        self.player = int(player)
        self.opponent_prompt = opponent_prompt
        self._opponent = self._make_opponent(opponent, opponent_url, opponent_model, opponent_max_tokens,
                                             opponent_prompt)
        # what an opponent seat reads: TextArena's text (a callable, or a served model so prompted), the chat of a
        # turnrl agent (opponent_prompt="agent"), or nothing (random, solver: they read the game's state)
        served = isinstance(self._opponent, _ServedOpponent)
        self._opponent_reads = ("chat" if served and opponent_prompt == "agent" else
                                None if self._opponent is None or isinstance(self._opponent, str) else "text")
        self._random: _OwnRandom | None = None
        self._done, self._reward, self._success, self._invalid = False, 0.0, False, 0
        self._history: dict[int, list[str]] = {}  # each opponent seat's messages, as TextArena's LLM text
        self._chats: dict[int, list[dict]] = {}  # and as a turnrl agent's chat (opponent_prompt="agent")
        self._board, self._seen, self._others = "", [], []

    # ------------------------------------------------------------------ construction

    def _fewest_players(self) -> int:
        errors = {}
        for n in range(1, 9):
            try:
                with _OwnRandom(0):
                    self._game.reset(num_players=n, seed=0)
                return n
            except LookupError as err:
                raise ValueError(_nltk_hint(self.game, err)) from None
            except Exception as err:  # a game refuses a player count with an assert or ValueError: try the next
                errors[n] = f"{type(err).__name__}: {str(err).strip()[:120]}"
        raise ValueError(f"TextArena game {self.game!r} could not be reset with 1 to 8 players (1: {errors[1]}; "
                         f"2: {errors[2]}); set num_players")

    def _make_opponent(self, opponent: str, url: str, model: str, max_tokens: int, prompt: str):
        if self.num_players == 1:
            if opponent or url:
                raise ValueError(f"{self.game!r} is a single-player game: it takes no opponent")
            return None
        if url:
            if opponent:
                raise ValueError("give opponent or opponent_url, not both")
            if prompt not in ("textarena", "agent"):
                raise ValueError(f"opponent_prompt must be 'textarena' or 'agent', got {prompt!r}")
            return _ServedOpponent(url, model, max_tokens)
        opponent = opponent or "random"
        if opponent in ("random", "solver"):
            if self.solver is None:
                raise ValueError(f"opponent {opponent!r} needs a turnrl solver for {self.game!r}, which has none "
                                 f"(solved: {', '.join(sorted(SOLVERS))}); give opponent='pkg.mod:fn' or "
                                 "opponent_url")
            return opponent
        if ":" not in opponent:
            raise ValueError(f"opponent must be 'random', 'solver' or 'package.module:function', got {opponent!r}")
        return _load_callable(opponent)

    # ------------------------------------------------------------------ gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        episode_seed = self._next_episode_seed(seed) % 2**32
        self._random = _OwnRandom(episode_seed, numpy=_uses_numpy_random(type(self._game)))
        self._opponent_rng = random.Random(episode_seed + 1)
        with self._random:
            # a fresh game object per episode: some keep state across resets (Kuhn Poker shuffles its deck in
            # place, so the same seed dealt other cards the second time)
            self._game = self._make_game()
            self._game.reset(num_players=self.num_players, seed=episode_seed)
        state = self._game.state
        self._allowance = getattr(state, "error_allowance", None)
        self._invalid_calls = 0
        rule = state.set_invalid_move

        def counted(*args, **kwargs):  # how the adapter learns that the game refused a move
            self._invalid_calls += 1
            return rule(*args, **kwargs)

        state.set_invalid_move = counted
        self._done, self._reward, self._success, self._invalid = False, 0.0, False, 0
        self._history = {pid: [] for pid in range(self.num_players)}
        self._chats = {pid: [] for pid in range(self.num_players)}
        self._board, self._seen, self._others = "", [], []
        self._play_others()
        return self._observation(), {"game": self.game, "player": self.player, "num_players": self.num_players,
                                     "metrics": self._metrics()}

    def step(self, action: str) -> StepResult:
        if self._random is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            return self._after_done_step(True, False, self._success)
        move = _bracketed(action[: self.max_action_chars] if isinstance(action, str) else "")
        refused = self._invalid_calls
        self._move(move, mine=True)
        valid = self._invalid_calls == refused
        self._invalid += not valid
        if not self._done:
            self._play_others()
        info = {"success": self._success, "action_valid": valid, "action_effective": valid, "metrics": self._metrics()}
        return StepResult(self._observation(), self._reward if self._done else 0.0, self._done, False, info)

    def available_actions(self) -> list[str]:
        return []

    def render(self) -> str:
        """What the policy's seat knows now: the newest board it was sent, or (games without board messages) the
        game's messages to it so far, without the reasons for refused moves. Never TextArena's `get_board_str`,
        which draws hidden state (GuessTheNumber's target, Mastermind's secret code); the rollout shows render()
        to the model after a reply it could not parse."""
        if self._board:
            return self._board
        return "\n".join(self._seen[-_RENDER_LINES:])

    def system_prompt(self, seat: int | None = None) -> str:
        """The rules prompt of the policy's seat (or of `seat`: what an `opponent_prompt="agent"` opponent gets)."""
        me = self.player if seat is None else seat
        others = [f"Player {pid}" for pid in range(self.num_players) if pid != me]
        verb = "are your opponents" if len(others) > 1 else "is your opponent"
        who = f" You are Player {me}; {', '.join(others)} {verb}." if others else ""
        return (f"You are playing the TextArena game {self.game}.{who} The game explains its rules and the move "
                "format in its first message.\n"
                "Reply with your move in the game's bracket format between <answer> and </answer>, e.g. "
                "<answer>[4]</answer>.")

    def expert_action(self) -> str:
        if self.solver is None:
            raise NotImplementedError(f"turnrl has no solver for TextArena's {type(self._game).__name__} "
                                      f"(solved: {', '.join(sorted(SOLVERS))}): it trains and evaluates without "
                                      "SFT demonstrations")
        if self._random is None or self._done:
            return ""
        return self.solver.best(self._game, self.player)

    # ------------------------------------------------------------------ internals

    def _move(self, move: str, mine: bool) -> None:
        state = self._game.state
        if self._allowance is not None:  # the policy may retry forever; opponents play by TextArena's rule
            state.error_allowance = 10**9 if mine and self.invalid_moves == "retry" else self._allowance
        with self._random:
            self._game.step(move)
        if state.done:
            self._finish()

    def _play_others(self) -> None:
        for _ in range(_MAX_OPPONENT_MOVES):
            state = self._game.state
            if state.done or state.current_player_id == self.player:
                return
            pid = state.current_player_id
            messages = self._take(pid)
            if self._opponent_reads == "text":
                self._history[pid].extend(self._format(messages, pid, own_moves=True))
            elif self._opponent_reads == "chat":
                self._chats[pid].append({"role": "user", "content": self._seat_text(messages, pid)})
            self._move(self._opponent_move(pid), mine=False)
        raise RuntimeError(f"{self.game}: the opponents made {_MAX_OPPONENT_MOVES} moves without the game "
                           f"handing the turn back to player {self.player}")

    def _opponent_move(self, pid: int) -> str:
        if self._opponent == "solver":
            return self.solver.best(self._game, pid)
        if self._opponent == "random":
            moves = self.solver.legal(self._game, pid)
            return self._opponent_rng.choice(moves) if moves else "[]"
        if not isinstance(self._opponent, _ServedOpponent):
            return str(self._opponent("\n".join(self._history[pid])))
        if self.opponent_prompt == "textarena":
            messages = [{"role": "system", "content": OPPONENT_SYSTEM},
                        {"role": "user", "content": "\n".join(self._history[pid])}]
        else:  # the chat a turnrl agent trained in this env sees in that seat: a served checkpoint plays as trained
            messages = [{"role": "system", "content": self.system_prompt(pid)}] + self._chats[pid]
        reply = self._opponent(messages)
        self._chats[pid].append({"role": "assistant", "content": reply})
        found = _ANSWER.search(reply)
        return _bracketed(found.group(1) if found else reply)

    def _take(self, pid: int) -> list:
        messages = self._game.state.observations.get(pid, [])
        self._game.state.observations[pid] = []
        return messages

    def _format(self, messages: list, pid: int, own_moves: bool = False) -> list[str]:
        """Messages as TextArena's LLM wrapper writes them; the seat's own moves only in TextArena's text
        (`own_moves`), as a chat already holds them as the seat's replies."""
        roles = getattr(self._game.state, "role_mapping", {}) or {}
        lines = []
        for sender, text, kind in messages:
            if sender == pid and kind == self._kinds.PLAYER_ACTION and not own_moves:
                continue
            who = "GAME" if sender == GAME_ID else roles.get(sender, f"Player {sender}")
            lines.append(f"[{who}] {str(text).strip()}")
        return lines

    def _seat_text(self, messages: list, pid: int) -> str:
        """A seat's new messages as its observation (`observe`)."""
        if self.observe == "board":
            boards = [i for i, m in enumerate(messages) if m[2] == self._kinds.GAME_BOARD]
            if boards:  # the rules (first turn), a reason the game gave for refusing a move, the newest board
                keep = (self._kinds.PROMPT, self._kinds.GAME_ADMIN)
                messages = [m for m in messages if m[2] in keep] + [messages[boards[-1]]]
        return "\n".join(self._format(messages, pid))

    def _observation(self) -> str:
        messages = self._take(self.player)
        for message in messages:  # what render() shows
            if message[2] == self._kinds.GAME_BOARD:
                self._board = self._format([message], self.player)[0]
            elif message[2] != self._kinds.GAME_ADMIN:
                self._seen.extend(self._format([message], self.player))
        lines = [self._seat_text(messages, self.player)]
        if self._done:
            info = self._game.state.game_info.get(self.player, {})
            reason = info.get("reason") if isinstance(info, dict) else None
            lines.append(f"[GAME] Game over: {reason or 'the game has ended.'}")
        return "\n".join(lines)

    def _finish(self) -> None:
        rewards = self._game.state.rewards or {}
        self._done = True
        self._reward = float(rewards.get(self.player, 0.0))
        others = [float(r) for pid, r in rewards.items() if pid != self.player]
        if self.num_players == 1:
            self._success = self._reward >= 1.0
        else:
            self._success = bool(others) and self._reward >= max(others) and self._reward > min(others)
        self._others = others

    def _metrics(self) -> dict[str, float]:
        """Reported from reset on and updated every step, so that an episode cut short by the rollout's turn limit
        counts as neither a win nor a draw nor a loss (env/win is then the multi-player success rate)."""
        metrics = {"invalid_moves": float(self._invalid)}
        if self.num_players > 1 and not self._done:
            metrics.update(win=0.0, draw=0.0, loss=0.0)
        elif self.num_players > 1:
            best_other = max(self._others, default=0.0)
            metrics.update(win=float(self._success), draw=float(self._reward == best_other and not self._success),
                           loss=float(self._reward < best_other))
        return metrics
