"""Data: the synthetic vocal/accompaniment generator and the stems-folder loader."""
