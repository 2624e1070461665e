"""Env textarena: TextArena's games as turnrl envs, with turnrl's solvers and opponents (turnrl.envs.tarena)."""
import random
import re

import pytest

from turnrl.envs import check_env, make

pytest.importorskip("textarena")

SOLVED = ["GuessTheNumber-v0", "TowerOfHanoi-v0", "LightsOut-v0", "FrozenLake-v0", "Mastermind-v0",
          "TicTacToe-v0", "Nim-v0", "ConnectFour-v0"]


def _play(env, seed, policy):
    obs, _ = env.reset(seed=seed)
    trace = [obs]
    for _ in range(500):
        obs, reward, term, trunc, info = env.step(policy(env))
        trace.append((obs, reward, term, info["action_valid"]))
        if term or trunc:
            return trace, reward, info
    raise AssertionError("the episode never ended")


@pytest.mark.parametrize("game", SOLVED)
def test_solved_games_pass_check_env(game):
    check_env(make("textarena", game=game))


@pytest.mark.parametrize("game", SOLVED[:5])
def test_the_solver_solves_every_single_player_game(game):
    env = make("textarena", game=game)
    assert env.num_players == 1
    for seed in range(40):
        _trace, reward, info = _play(env, seed, lambda e: e.expert_action())
        assert info["success"] and reward == 1.0 and info["metrics"] == {"invalid_moves": 0.0}


def test_the_connect_four_solver_wins_against_random_drops():
    four = make("textarena", game="ConnectFour-v0")  # against random drops: four in a row every time
    assert all(_play(four, seed, lambda e: e.expert_action())[2]["success"] for seed in range(20))
    blocked = make("textarena", game="ConnectFour-v0", opponent="solver")
    _trace, _reward, info = _play(blocked, 0, lambda e: e.expert_action())
    assert info["metrics"]["win"] + info["metrics"]["draw"] + info["metrics"]["loss"] == 1.0


def test_two_player_solvers_win_or_draw_as_game_theory_says():
    ttt = make("textarena", game="TicTacToe-v0")  # vs. random moves: minimax never loses, and mostly wins
    outcomes = [_play(ttt, seed, lambda e: e.expert_action())[2]["metrics"] for seed in range(40)]
    assert sum(m["loss"] for m in outcomes) == 0 and sum(m["win"] for m in outcomes) >= 30
    perfect = make("textarena", game="TicTacToe-v0", opponent="solver")  # perfect play on both sides: a draw
    _trace, reward, info = _play(perfect, 0, lambda e: e.expert_action())
    assert reward == 0.0 and info["metrics"]["draw"] == 1.0 and not info["success"]
    first = make("textarena", game="Nim-v0", opponent="solver")  # piles 3^4^5 != 0: the first player wins
    second = make("textarena", game="Nim-v0", opponent="solver", player=1)
    _trace, reward, info = _play(first, 0, lambda e: e.expert_action())
    assert reward == 1.0 and info["success"]
    _trace, reward, info = _play(second, 0, lambda e: e.expert_action())
    assert reward == -1.0 and info["metrics"]["loss"] == 1.0


def test_observations_are_the_seats_new_messages_and_the_opponents_moves():
    env = make("textarena", game="TicTacToe-v0", opponent="solver")
    obs, info = env.reset(seed=0)
    assert info == {"game": "TicTacToe-v0", "player": 0, "num_players": 2,
                    "metrics": {"invalid_moves": 0.0, "win": 0.0, "draw": 0.0, "loss": 0.0}}
    assert obs.startswith("[GAME] You are Player 0 in Tic Tac Toe.") and "Available Moves" in obs
    obs, reward, term, _trunc, info = env.step("4")  # no brackets: bracketed for the game
    assert info["action_valid"] and reward == 0.0 and not term
    assert "[GAME] Player 0 placed their symbol (O) in cell 4." in obs
    assert re.search(r"\[Player 1\] \[\d\]", obs)  # the opponent's move, then the board after it
    assert "[Player 0]" not in obs  # the policy's own move is its reply, not part of the observation


def test_board_observations_hold_the_newest_board_and_why_a_move_was_refused():
    env = make("textarena", game="TicTacToe-v0", observe="board", opponent="solver")
    check_env(env)
    obs, _ = env.reset(seed=0)
    assert obs.startswith("[GAME] You are Player 0 in Tic Tac Toe.") and obs.count("Current Board:") == 1
    obs = env.step("[9]")[0]
    assert obs.splitlines()[0].startswith("[GAME] Player 0 attempted an invalid move.") and obs.count("Board") == 1
    obs = env.step("[4]")[0]
    assert obs.count("Current Board") == 1 and " O " in obs and " X " in obs  # after the opponent's answer
    assert "[Player 1]" not in obs
    full = make("textarena", game="TicTacToe-v0", opponent="solver")
    full.reset(seed=0)
    assert len(obs) < len(full.step("[4]")[0]) / 2
    assert make("textarena", game="GuessTheNumber-v0", observe="board").reset(seed=0)[0].startswith(
        "[GAME] You are Player 0")  # no board message: all messages


def test_invalid_moves_are_retried_by_default_and_end_the_game_under_textarenas_rule():
    env = make("textarena", game="TicTacToe-v0")
    env.reset(seed=0)
    before = env.render()
    for _ in range(5):
        obs, reward, term, _trunc, info = env.step("[9]")
        assert not info["action_valid"] and reward == 0.0 and not term and env.render() == before
        assert "attempted an invalid move" in obs
    _obs, _r, _t, _tr, info = env.step("[4]")
    assert info["action_valid"]
    strict = make("textarena", game="TicTacToe-v0", invalid_moves="textarena")
    strict.reset(seed=0)
    assert not strict.step("[9]")[2]  # TextArena allows one invalid move ...
    obs, reward, term, _trunc, info = strict.step("[9]")  # ... and the second loses the game
    assert term and reward == -1.0 and info["metrics"] == {"invalid_moves": 2.0, "win": 0.0, "draw": 0.0,
                                                            "loss": 1.0}
    assert "Game over" in obs


def _actions(text: str) -> list[str]:
    """Kuhn Poker's list of legal moves in its newest message."""
    return re.findall(r"'(\[\w+\])'", text.rsplit("available actions", 1)[-1])


def cautious(observation: str) -> str:
    """A callable Kuhn Poker opponent: checks or calls when it may, else the first legal move."""
    moves = _actions(observation)
    return next((m for m in ("[check]", "[call]") if m in moves), moves[0] if moves else "[fold]")


def _kuhn(seed):
    env = make("textarena", game="KuhnPoker-v0", opponent="test_envs_textarena:cautious")
    rng = random.Random(seed)
    env._last = env.reset(seed=seed)[0]
    return env, rng, [env._last]


def _kuhn_step(env, rng, trace):
    obs, reward, term, _trunc, info = env.step(rng.choice(_actions(env._last) or ["[fold]"]))
    env._last = obs
    trace.append((obs, reward, term, info["action_valid"]))
    return term


def test_episodes_played_side_by_side_are_those_played_alone_and_global_random_is_untouched():
    # Kuhn Poker deals new cards every round from Python's global generator
    expected = {}
    for seed in (3, 4):
        env, rng, trace = _kuhn(seed)
        while not _kuhn_step(env, rng, trace):
            pass
        expected[seed] = trace
    random.seed(123)
    state = random.getstate()
    games = {seed: _kuhn(seed) for seed in (3, 4)}
    done = set()
    while len(done) < 2:  # interleaved step by step, with other code drawing from `random` in between
        for seed, (env, rng, trace) in games.items():
            if seed not in done and _kuhn_step(env, rng, trace):
                done.add(seed)
            state = (random.random(), random.getstate())[1]
    assert {seed: trace for seed, (_e, _r, trace) in games.items()} == expected
    assert random.getstate() == state
    assert len({str(t) for t in expected.values()}) == 2


def first_free(observation: str) -> str:
    """A callable opponent: the first move TicTacToe lists as available in its newest board."""
    return re.findall(r"Available Moves: '(\[\d\])'", observation)[-1]


SEEN = []


def recording_opponent(observation: str) -> str:
    SEEN.append(observation)
    return first_free(observation)


def test_a_callable_opponent_gets_textarenas_full_text_for_its_seat():
    SEEN.clear()
    env = make("textarena", game="TicTacToe-v0", opponent="test_envs_textarena:recording_opponent")
    _trace, _reward, info = _play(env, 0, lambda e: e.expert_action())
    assert info["success"]  # minimax beats first-free
    assert SEEN and SEEN[0].startswith("[GAME] You are Player 1 in Tic Tac Toe.")
    assert all(a in b for a, b in zip(SEEN, SEEN[1:]))  # the history grows: each text holds the one before
    assert "[Player 0] [" in SEEN[-1] and "[Player 1] [" in SEEN[-1]  # TextArena's text holds both seats' moves


def test_a_served_opponent_is_asked_through_the_openai_api():
    from test_judge import JudgeServer

    class Opponent(JudgeServer):
        def answer(self, messages):
            assert messages[0]["role"] == "system" and "game player" in messages[0]["content"]
            return "I take " + first_free(messages[1]["content"])

    server = Opponent(models=("opponent-1",))
    try:
        env = make("textarena", game="TicTacToe-v0", opponent_url=server.url, opponent_model="opponent-1")
        _trace, _reward, info = _play(env, 0, lambda e: e.expert_action())
        assert info["success"] and len(server.requests) >= 2
        assert all(r["model"] == "opponent-1" for r in server.requests)
        with pytest.raises(ValueError, match="does not serve 'opponent-2'"):
            make("textarena", game="TicTacToe-v0", opponent_url=server.url, opponent_model="opponent-2")
    finally:
        server.close()


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="did you mean 'TicTacToe-v0'"):
        make("textarena", game="TicTacToe-v9")
    with pytest.raises(ValueError, match="single-player game: it takes no opponent"):
        make("textarena", game="GuessTheNumber-v0", opponent="random")
    with pytest.raises(ValueError, match="needs a turnrl solver"):
        make("textarena", game="Othello-v0")  # no solver: give an opponent
    with pytest.raises(ValueError, match="package.module:function"):
        make("textarena", game="TicTacToe-v0", opponent="minimax")
    with pytest.raises(ValueError, match="rejected its arguments"):
        make("textarena", game="TowerOfHanoi-v0", disks=4)
    with pytest.raises(ValueError, match="player must be a seat"):
        make("textarena", game="Nim-v0", player=2)
    with pytest.raises(ValueError, match="invalid_moves"):
        make("textarena", game="Nim-v0", invalid_moves="forgive")
    if __import__("sys").version_info < (3, 12):  # TextArena 0.7.4's IteratedStagHunt uses 3.12 f-strings
        with pytest.raises(ValueError, match="cannot be loaded here: SyntaxError"):
            make("textarena", game="IteratedStagHunt-v0", opponent="test_envs_textarena:first_column")
    with pytest.raises(ValueError, match="observe must be"):
        make("textarena", game="Nim-v0", observe="screen")


def test_a_game_without_a_solver_plays_but_has_no_expert():
    env = make("textarena", game="Othello-v0", opponent="test_envs_textarena:first_column")
    obs, _ = env.reset(seed=0)
    assert "Valid moves: '[2, 3]'" in obs
    _obs, _reward, _term, _trunc, info = env.step("[2, 3]")
    assert info["action_valid"]
    with pytest.raises(NotImplementedError, match="no solver"):
        env.expert_action()


def first_column(observation: str) -> str:
    return "[col 0]"


def test_game_arguments_reach_the_game():
    env = make("textarena", game="TowerOfHanoi-v0", num_disks=4)
    _trace, reward, info = _play(env, 0, lambda e: e.expert_action())
    assert reward == 1.0 and env._game.state.turn == 15  # 2^4 - 1 moves: the solver is optimal


def test_training_on_a_game_without_a_solver_refuses_sft_demonstrations(tmp_path, capsys):
    from turnrl.cli import main

    args = ["train", "--preset", "quickstart", "--env.name", "textarena", "--env.kwargs", "game", "Othello-v0",
            "opponent", "test_envs_textarena:first_column", "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert "has no solver" in capsys.readouterr().err
    assert main(["demos", "textarena", "--kwargs", '{"game": "Othello-v0", "opponent": "test_envs_textarena:'
                 'first_column"}', "--out", str(tmp_path / "d.jsonl")]) == 2
    assert "has no solver" in capsys.readouterr().err and not (tmp_path / "d.jsonl").exists()


def test_rollouts_with_env_threads_play_the_episodes_of_one_thread(tiny_tokenizer):
    from scripted import ScriptedEngine
    from turnrl.context import ChatRenderer
    from turnrl.engines import SamplingParams
    from turnrl.rollout import RolloutSettings, run_episodes

    moves = ["[check]", "[call]", "[bet]", "[fold]", "junk"]

    def play(threads):
        settings = RolloutSettings(max_turns=6, max_actions_per_turn=1, max_new_tokens=16, think=False,
                                   env_threads=threads)
        engine = ScriptedEngine(tiny_tokenizer, lambda call, row, _p: moves[(call + 3 * row) % 5] + "</answer><|im_end|>")
        renderer = ChatRenderer(tiny_tokenizer, system_prompt=None, response_prefix="<answer>")
        return run_episodes(engine, renderer, lambda: make("textarena", game="KuhnPoker-v0",
                                                           opponent="test_envs_textarena:cautious"),
                            [5, 6, 7], 2, settings, SamplingParams(max_new_tokens=16), env_name="textarena")

    one = play(0)
    assert not any(t.failed for t in one) and any("Starting round 2" in str(t.transcript) for t in one)
    assert [(t.ids, t.turn_rewards, t.transcript) for t in play(4)] == [(t.ids, t.turn_rewards, t.transcript)
                                                                      for t in one]


def test_games_that_draw_from_numpy_get_their_own_numpy_state_too():
    np = pytest.importorskip("numpy")
    env, other = make("textarena", game="Sokoban-v0"), make("textarena", game="Sokoban-v0")  # rooms from np.random
    first = env.reset(seed=1)[0]
    rooms = {other.reset(seed=seed)[0] for seed in range(2, 6)}
    np.random.seed(7)
    state = np.random.get_state()[1].copy()
    assert env.reset(seed=1)[0] == first and len(rooms | {first}) >= 4
    assert (np.random.get_state()[1] == state).all()


@pytest.mark.parametrize("game", ["GuessTheNumber-v0", "Mastermind-v0", "TicTacToe-v0"])
def test_render_shows_only_what_the_seat_was_told(game):
    env = make("textarena", game=game)
    for seed in range(5):
        told = env.reset(seed=seed)[0]
        for move in ("junk", env.expert_action(), env.expert_action()):
            told += "\n" + env.step(move)[0]
            shown = env.render()
            assert shown and all(line in told for line in shown.splitlines())
            assert "Target Number" not in shown and "Secret Code" not in shown  # TextArena's drawings of the answer
    if game == "TicTacToe-v0":  # a game with board messages: the newest board
        assert env.render().startswith("[GAME] Current Board:") and env.render().count("Current Board") == 1


class _NeedsCorpus:
    def __init__(self):
        raise LookupError("\n***\n  Resource 'words' not found.\n  Please use the NLTK Downloader\n***")


class _NoSeats:
    def reset(self, num_players, seed=None):
        raise AssertionError(f"this game is for 9 players, not {num_players}")


@pytest.mark.parametrize("cls, message", [(_NeedsCorpus, "needs NLTK data .*Resource 'words' not found"),
                                          (_NoSeats, "1 to 8 players .*1: AssertionError: this game is for 9")])
def test_games_that_cannot_start_here_say_why(monkeypatch, cls, message):
    from textarena.envs.registration import ENV_REGISTRY, EnvSpec

    monkeypatch.setitem(ENV_REGISTRY, "Broken-v0", EnvSpec(id="Broken-v0", entry_point=cls, default_wrappers=[],
                                                            kwargs={}))
    with pytest.raises(ValueError, match=message):
        make("textarena", game="Broken-v0")


def test_succ_at_k_is_reported_for_multi_attempt_envs_only():
    from turnrl.evaluate import eval_result
    from turnrl.rollout import RolloutSettings

    settings = RolloutSettings(max_turns=5, max_actions_per_turn=1, max_new_tokens=8, think=False)

    def qa(name, **kwargs):
        return eval_result([], None, k=1, episodes=1, temperature=1.0, make_env=lambda: make(name, **kwargs),
                           settings=settings).qa

    assert qa("textarena", game="TicTacToe-v0") is None  # a game's turns are moves, not attempts at one answer
    assert qa("tool_math") is None
    assert set(qa("math_qa")) == {"mean_turns_to_success", "unique_answer_ratio"}  # (no episodes: no succ@k)


def test_a_served_opponent_can_be_sent_the_chat_a_turnrl_agent_sees():
    from test_judge import JudgeServer

    class Agent(JudgeServer):  # answers like a turnrl agent: the move without brackets, inside <answer>
        def answer(self, messages):
            board = [m["content"] for m in messages if m["role"] == "user"][-1]
            return "<answer>" + first_free(board)[1:-1] + "</answer>"

    server = Agent(models=("agent-1",))
    try:
        env = make("textarena", game="TicTacToe-v0", opponent_url=server.url, opponent_prompt="agent",
                   observe="board")
        _trace, _reward, info = _play(env, 0, lambda e: e.expert_action())
        assert info["success"]
        first, last = server.requests[0]["messages"], server.requests[-1]["messages"]
        assert first[0] == {"role": "system", "content": env.system_prompt(1)}
        assert "You are Player 1; Player 0 is your opponent." in first[0]["content"]
        assert first[1]["role"] == "user" and first[1]["content"].startswith("[GAME] You are Player 1 in Tic Tac Toe")
        assert [m["role"] for m in last] == ["system"] + ["user", "assistant"] * (len(last) // 2 - 1) + ["user"]
        assert last[-1]["content"].count("Current Board") == 1  # observe="board" for the opponent's seat too
        placed = sum(cell == "X" for row in env._game.state.game_state["board"] for cell in row)
        assert placed == len(server.requests) >= 2  # every unbracketed <answer>4</answer> was played as [4]
        with pytest.raises(ValueError, match="opponent_prompt"):
            make("textarena", game="TicTacToe-v0", opponent_url=server.url, opponent_prompt="turnrl")
    finally:
        server.close()


def test_a_seed_replays_its_game_on_an_instance_that_has_played_before():
    env = make("textarena", game="KuhnPoker-v0", opponent="test_envs_textarena:cautious")  # shuffles its deck
    first = [env.reset(seed=seed)[0] for seed in range(6)]  # in place: TextArena's object deals differently
    assert [env.reset(seed=seed)[0] for seed in range(6)] == first  # the second time; a fresh one per episode
    assert len(set(first)) > 1
