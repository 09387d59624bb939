import pytest

from fwdfed.memory import current_rss, parse_size, peak_rss


@pytest.mark.parametrize("text, size", [("1.5GB", 1_500_000_000), ("1500MB", 1_500_000_000), ("800MiB", 800 * 2**20),
                                        ("2gib", 2 * 2**30), ("4096", 4096), (" 10 KB ", 10_000)])
def test_sizes_people_write(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "1.5XB", "-1GB", "0MB", "1,5GB", "lots", "1e9"])
def test_nonsense_is_refused_with_a_hint(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_size(text)


def test_peak_is_at_least_current():
    assert peak_rss() >= current_rss() > 10 * 2**20
