"""Solvers for TextArena games (turnrl.envs.tarena): each game's legal moves and its best move, as move strings.

A solver reads the game's own state (`game.state.game_state`, the fields TextArena's env class keeps) and returns
moves in the game's bracket syntax, e.g. "[4]" for TicTacToe or "[A C]" for Tower of Hanoi. They give the adapter
its `expert_action` (SFT demonstrations, `check_env`) and its built-in opponents (`opponent="solver"` plays the
best move, `opponent="random"` a uniformly random legal one). Written here because TextArena ships games, not
solvers. Keyed by the game's env class, so every registered variant of a game (`-train`, `-raw`, `-hard`) shares it.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from typing import Any, Callable

Game = Any  # a TextArena env instance (its class is what the solver is registered for)


class Solver:
    """One game's moves. `legal` lists the legal moves of player `pid` now; `best` is the solver's choice."""

    def legal(self, game: Game, pid: int) -> list[str]:
        raise NotImplementedError

    def best(self, game: Game, pid: int) -> str:
        raise NotImplementedError


class GuessTheNumber(Solver):
    """Binary search over the range the hints leave."""

    def _range(self, game: Game) -> tuple[int, int]:
        lo, hi = game.min_number, game.max_number
        for guess, hint in game.state.game_state["guess_history"]:
            if hint == "higher":
                lo = max(lo, guess + 1)
            else:
                hi = min(hi, guess - 1)
        return lo, hi

    def legal(self, game: Game, pid: int) -> list[str]:
        guessed = {g for g, _ in game.state.game_state["guess_history"]}
        return [f"[{n}]" for n in range(game.min_number, game.max_number + 1) if n not in guessed]

    def best(self, game: Game, pid: int) -> str:
        lo, hi = self._range(game)
        return f"[{(lo + hi) // 2}]"


class TowerOfHanoi(Solver):
    """The optimal next move from any legal position: to bring disk n onto a peg, first park the smaller disks on
    the third peg."""

    def legal(self, game: Game, pid: int) -> list[str]:
        towers = game.state.game_state["towers"]
        return [f"[{a} {b}]" for a in towers for b in towers
                if a != b and towers[a] and (not towers[b] or towers[b][-1] > towers[a][-1])]

    def best(self, game: Game, pid: int) -> str:
        towers = game.state.game_state["towers"]
        where = {disk: peg for peg, disks in towers.items() for disk in disks}

        def next_move(n: int, target: str) -> tuple[str, str] | None:
            if n == 0:
                return None
            if where[n] == target:
                return next_move(n - 1, target)
            spare = ({"A", "B", "C"} - {where[n], target}).pop()
            return next_move(n - 1, spare) or (where[n], target)

        move = next_move(game.num_disks, "C")
        return f"[{move[0]} {move[1]}]" if move else "[A C]"


def _gf2_solve(rows: list[int], rhs: list[int], n: int) -> tuple[int | None, list[int]]:
    """One solution of A x = b over GF(2) (rows as bit masks of the n unknowns) and a basis of A's null space."""
    rows, rhs = list(rows), list(rhs)
    pivots, r = [], 0
    for col in range(n):
        hit = next((i for i in range(r, len(rows)) if rows[i] >> col & 1), None)
        if hit is None:
            continue
        rows[r], rows[hit], rhs[r], rhs[hit] = rows[hit], rows[r], rhs[hit], rhs[r]
        for i in range(len(rows)):
            if i != r and rows[i] >> col & 1:
                rows[i] ^= rows[r]
                rhs[i] ^= rhs[r]
        pivots.append(col)
        r += 1
    if any(rhs[i] for i in range(r, len(rows))):
        return None, []
    x = 0
    for i, col in enumerate(pivots):
        if rhs[i]:
            x |= 1 << col
    basis = []
    for free in (c for c in range(n) if c not in pivots):
        v = 1 << free
        for i, col in enumerate(pivots):
            if rows[i] >> free & 1:
                v |= 1 << col
        basis.append(v)
    return x, basis


class LightsOut(Solver):
    """Linear algebra over GF(2): the set of presses that turns every light off, with the fewest presses."""

    def legal(self, game: Game, pid: int) -> list[str]:
        return [f"[{r} {c}]" for r in range(game.size) for c in range(game.size)]

    def best(self, game: Game, pid: int) -> str:
        size, grid = game.size, game.state.game_state["grid"]
        n = size * size
        rows = []
        for r, c in itertools.product(range(size), range(size)):  # light (r, c) flips with these presses
            mask = 0
            for dr, dc in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                if 0 <= r + dr < size and 0 <= c + dc < size:
                    mask |= 1 << ((r + dr) * size + c + dc)
            rows.append(mask)
        x, basis = _gf2_solve(rows, [int(bool(grid[r][c])) for r in range(size) for c in range(size)], n)
        if x is None:
            return "[0 0]"
        if len(basis) <= 12:  # the fewest presses among all solutions (two free presses on a 5x5 board)
            for combo in range(1, 1 << len(basis)):
                y = x
                for i, v in enumerate(basis):
                    if combo >> i & 1:
                        y ^= v
                if bin(y).count("1") < bin(x).count("1"):
                    x = y
        cell = (x & -x).bit_length() - 1 if x else 0
        return f"[{cell // size} {cell % size}]"


class FrozenLake(Solver):
    """Breadth-first search to the goal around the holes."""

    MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}

    def legal(self, game: Game, pid: int) -> list[str]:
        (r, c), size = game.state.game_state["player_pos"], game.size
        return [f"[{m}]" for m, (dr, dc) in self.MOVES.items() if 0 <= r + dr < size and 0 <= c + dc < size]

    def best(self, game: Game, pid: int) -> str:
        gs, size = game.state.game_state, game.size
        start, goal = tuple(gs["player_pos"]), tuple(gs["goal_pos"])
        first: dict[tuple, str | None] = {start: None}
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            if (r, c) == goal:
                break
            for m, (dr, dc) in self.MOVES.items():
                nxt = (r + dr, c + dc)
                if 0 <= nxt[0] < size and 0 <= nxt[1] < size and nxt not in first and gs["grid"][nxt[0]][nxt[1]] != "H":
                    first[nxt] = first[(r, c)] or m
                    queue.append(nxt)
        return f"[{first.get(goal) or self.legal(game, pid)[0][1:-1]}]"


class Mastermind(Solver):
    """Guess the first code (in lexicographic order) consistent with every answer so far."""

    @staticmethod
    def pegs(guess: tuple[int, ...], code: tuple[int, ...]) -> tuple[int, int]:
        black = sum(g == c for g, c in zip(guess, code))
        common = sum(min(guess.count(d), code.count(d)) for d in set(guess))
        return black, common - black

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def codes(length: int, numbers: int, duplicates: bool) -> tuple[tuple[int, ...], ...]:
        digits = range(1, numbers + 1)
        gen = itertools.product(digits, repeat=length) if duplicates else itertools.permutations(digits, length)
        return tuple(gen)

    def _candidates(self, game: Game) -> list[tuple[int, ...]]:
        gs = game.state.game_state
        seen = [(tuple(h["guess"]), (h["black"], h["white"])) for h in gs["history"]]
        return [code for code in self.codes(gs["code_length"], gs["num_numbers"], gs["duplicate_numbers"])
                if all(self.pegs(g, code) == fb for g, fb in seen)]

    def legal(self, game: Game, pid: int) -> list[str]:
        gs = game.state.game_state
        tried = {tuple(h["guess"]) for h in gs["history"]}
        return [self._fmt(c) for c in self.codes(gs["code_length"], gs["num_numbers"], gs["duplicate_numbers"])
                if c not in tried]

    def best(self, game: Game, pid: int) -> str:
        candidates = self._candidates(game)
        return self._fmt(candidates[0]) if candidates else self.legal(game, pid)[0]

    @staticmethod
    def _fmt(code: tuple[int, ...]) -> str:
        return "[" + " ".join(map(str, code)) + "]"


_LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))


@functools.lru_cache(maxsize=None)
def _ttt_value(board: str, me: str, other: str) -> int:
    """Minimax value of a TicTacToe board for `me`, to move: +1 win, 0 draw, -1 loss."""
    if any(board[a] == board[b] == board[c] == other for a, b, c in _LINES):
        return -1
    free = [i for i, ch in enumerate(board) if ch == " "]
    if not free:
        return 0
    return max(-_ttt_value(board[:i] + me + board[i + 1:], other, me) for i in free)


class TicTacToe(Solver):
    """Minimax over the whole game tree (memoised); the lowest cell among equally good moves."""

    @staticmethod
    def _board(game: Game) -> str:
        return "".join(cell or " " for row in game.state.game_state["board"] for cell in row)

    def legal(self, game: Game, pid: int) -> list[str]:
        return [f"[{i}]" for i, ch in enumerate(self._board(game)) if ch == " "]

    def best(self, game: Game, pid: int) -> str:
        board = self._board(game)
        me, other = ("X", "O") if pid == 1 else ("O", "X")  # TextArena: player 1 is X, player 0 is O
        free = [i for i, ch in enumerate(board) if ch == " "] or [0]
        best = max(free, key=lambda i: (-_ttt_value(board[:i] + me + board[i + 1:], other, me), -i))
        return f"[{best}]"


class Nim(Solver):
    """Bouton's theorem (normal play, last object wins): leave a position whose piles' XOR is 0."""

    def legal(self, game: Game, pid: int) -> list[str]:
        piles = game.state.game_state["piles"]
        return [f"[{i} {q}]" for i, size in enumerate(piles) for q in range(1, size + 1)]

    def best(self, game: Game, pid: int) -> str:
        piles = game.state.game_state["piles"]
        total = functools.reduce(lambda a, b: a ^ b, piles, 0)
        for i, size in enumerate(piles):
            if total and size ^ total < size:
                return f"[{i} {size - (size ^ total)}]"
        i = max(range(len(piles)), key=lambda k: piles[k])  # a lost position: take one and hope
        return f"[{i} 1]"


class ConnectFour(Solver):
    """Negamax with alpha-beta to a fixed depth (3 plies): win now, block the opponent's win, else the move whose
    worst case is best, scored by open lines of two and three; centre columns first among equals."""

    DEPTH = 3

    def legal(self, game: Game, pid: int) -> list[str]:
        board = game.state.game_state["board"]
        return [f"[{c}]" for c in range(len(board[0])) if board[0][c] == "."]

    def best(self, game: Game, pid: int) -> str:
        board = [list(row) for row in game.state.game_state["board"]]
        me, other = ("X", "O") if pid == 0 else ("O", "X")  # TextArena: player 0 drops X
        cols = sorted(range(len(board[0])), key=lambda c: abs(c - (len(board[0]) - 1) / 2))
        moves = [c for c in cols if board[0][c] == "."] or [0]
        scored = [(-self._negamax(self._drop(board, c, me), other, me, self.DEPTH - 1, -10**9, 10**9), c)
                  for c in moves]
        return f"[{max(scored, key=lambda sc: sc[0])[1]}]"  # max keeps the first (most central) of equals

    @staticmethod
    def _drop(board: list[list[str]], col: int, mark: str) -> list[list[str]]:
        out = [row[:] for row in board]
        for r in range(len(out) - 1, -1, -1):
            if out[r][col] == ".":
                out[r][col] = mark
                break
        return out

    @staticmethod
    def _windows(board: list[list[str]]):
        rows, cols = len(board), len(board[0])
        for r in range(rows):
            for c in range(cols):
                for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
                    if 0 <= r + 3 * dr < rows and 0 <= c + 3 * dc < cols:
                        yield [board[r + i * dr][c + i * dc] for i in range(4)]

    def _score(self, board: list[list[str]], me: str, other: str) -> int:
        """+-10^6 for four in a row, else open twos and threes (for `me` minus for `other`)."""
        total = 0
        for w in self._windows(board):
            mine, theirs = w.count(me), w.count(other)
            if mine == 4:
                return 10**6
            if theirs == 4:
                return -10**6
            if theirs == 0:
                total += (0, 0, 2, 10)[mine] if mine < 4 else 0
            elif mine == 0:
                total -= (0, 0, 2, 10)[theirs] if theirs < 4 else 0
        return total

    def _negamax(self, board, me: str, other: str, depth: int, alpha: int, beta: int) -> int:
        """Value of `board` for `me`, to move."""
        score = self._score(board, me, other)
        moves = [c for c in range(len(board[0])) if board[0][c] == "."]
        if abs(score) >= 10**6 or depth == 0 or not moves:
            return score
        best = -10**9
        for c in moves:
            best = max(best, -self._negamax(self._drop(board, c, me), other, me, depth - 1, -beta, -alpha))
            alpha = max(alpha, best)
            if alpha >= beta:
                break
        return best


SOLVERS: dict[str, Callable[[], Solver]] = {
    "GuessTheNumberEnv": GuessTheNumber, "TowerOfHanoiEnv": TowerOfHanoi, "LightsOutEnv": LightsOut,
    "FrozenLakeEnv": FrozenLake, "MastermindEnv": Mastermind, "TicTacToeEnv": TicTacToe, "NimEnv": Nim,
    "ConnectFourEnv": ConnectFour,
}
