"""The memory run's pure helpers: the value after each hour of event time and the growth per hour."""
from scripts.benchmark.memory_stats import HOUR_MS, at_hours, first_steady_hour, growth_per_hour, slope

START = 1_700_000_000_000


def test_at_hours_takes_the_first_sample_past_each_hour_mark():
    samples = [(None, 1.0), (START + 10, 2.0), (START + HOUR_MS - 1, 3.0), (START + HOUR_MS, 4.0),
               (START + HOUR_MS + 5, 5.0), (START + 3 * HOUR_MS + 7, 6.0), (START + 3 * HOUR_MS + 9, 7.0)]
    # Hour 1 is reached by the 4th sample; hours 2 and 3 are both first passed by the 6th (a jump).
    assert at_hours(samples, START, 4) == [4.0, 6.0, 6.0, None]


def test_at_hours_ignores_samples_without_progress():
    assert at_hours([(None, 9.0), (None, 8.0)], START, 2) == [None, None]


def test_slope_of_a_line_and_of_noise_around_a_flat_value():
    assert abs(slope([(1, 3.0), (2, 5.0), (3, 7.0), (4, 9.0)]) - 2.0) < 1e-12
    # Sum of (x - 3.5)(y - 11) is 3.0, of (x - 3.5)^2 is 17.5.
    assert abs(slope([(1, 10.0), (2, 12.0), (3, 10.0), (4, 12.0), (5, 10.0), (6, 12.0)]) - 3.0 / 17.5) < 1e-12
    flat = slope([(h, 100.0 + (1 if h % 2 else -1)) for h in range(1, 21)])
    assert abs(flat) < 0.1
    assert slope([(1, 5.0)]) is None
    assert slope([(2, 5.0), (2, 6.0)]) is None


def test_growth_fits_only_the_hours_from_the_first_steady_one_that_have_a_value():
    # Hours 1-2 ramp up (windows not yet expiring), then +0.5 per hour; hour 5 has no sample.
    per_hour = [100.0, 400.0, 500.0, 500.5, None, 501.5, 502.0]
    growth, hours = growth_per_hour(per_hour, first_steady_hour(3600))
    assert first_steady_hour(3600) == 3
    assert hours == [3, 4, 6, 7]
    assert abs(growth - 0.5) < 1e-9


def test_first_steady_hour_follows_the_allowed_lateness():
    assert first_steady_hour(0) == 2
    assert first_steady_hour(1800) == 3
    assert first_steady_hour(7200) == 4
