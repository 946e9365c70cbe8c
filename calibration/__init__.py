"""PTQ4ADM calibration: conditioning coverage, activation-aware sampling, sensitivity, plans."""
