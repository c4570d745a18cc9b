"""The device-resident block table (kvcache/device_table.py): after every update each row
starts with its sequence's blocks, only changed cells are written, and the shape stays
fixed while batches fit."""

import random

import numpy as np
import pytest

from slabserve.kvcache.device_table import DeviceBlockTable


def _rows_match(table: DeviceBlockTable, tables: list[list[int]]) -> bool:
    arr = np.array(table.array)
    return all(list(arr[i, :len(t)]) == t for i, t in enumerate(tables))


def test_growing_sequences_write_one_cell_per_new_block():
    t = DeviceBlockTable(64)
    tables = [[1, 2], [3], [4, 5, 6]]
    t.update(tables)
    assert t.cells_written == 6 and t.shape == (3, 64)
    tables[1].append(7)  # one sequence took a new block
    t.update(tables)
    assert t.cells_written == 7 and _rows_match(t, tables)
    t.update(tables)  # nothing changed: nothing written
    assert t.cells_written == 7


def test_a_row_taken_by_another_sequence_is_rewritten():
    t = DeviceBlockTable(16)
    t.update([[1, 2, 3], [4, 5]])
    t.update([[4, 5], [1, 2, 3]])  # the order changed: both rows rewritten
    assert t.cells_written == 10 and _rows_match(t, [[4, 5], [1, 2, 3]])
    t.update([[1, 9]])  # a shorter row sharing a prefix: rewritten, not trusted
    assert _rows_match(t, [[1, 9]])


def test_random_steps_against_host_tables():
    """Sequences come, grow and go in random order (prefixes shared as with prefix
    caching); every row always starts with its sequence's blocks and the shape changes
    only when a batch is larger than any before."""
    rng = random.Random(3)
    t = DeviceBlockTable(256, rows=4)
    live: list[list[int]] = []
    shapes = set()
    for _ in range(300):
        if live and rng.random() < 0.15:
            live.pop(rng.randrange(len(live)))
        if len(live) < 12 and rng.random() < 0.3:
            shared = rng.choice(live)[:rng.randrange(1, 3)] if live and rng.random() < 0.5 else []
            live.insert(rng.randrange(len(live) + 1), shared + [rng.randrange(1000)])
        for seq in live:
            if rng.random() < 0.3 and len(seq) < 256:
                seq.append(rng.randrange(1000))
        if not live:
            continue
        rows_before = t.rows
        t.update(live)
        assert _rows_match(t, live)
        assert t.rows == max(rows_before, len(live)) and t.width == 256
        shapes.add(t.shape)
    assert len(shapes) <= 12


def test_a_row_wider_than_the_table_widens_it():
    t = DeviceBlockTable(4)
    t.update([[1, 2]])
    t.update([[1, 2, 3, 4, 5]])
    assert t.width == 8 and _rows_match(t, [[1, 2, 3, 4, 5]])


def test_rejects_empty_shapes():
    with pytest.raises(ValueError):
        DeviceBlockTable(0)
