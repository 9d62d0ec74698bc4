"""Stand-ins for what the sweep report reads of Tune's results (no Ray, no pandas needed)."""


class Frame(dict):
    """A pandas DataFrame as the report reads it: ``in`` and columns with ``tolist``/``iloc``."""

    class _Col(list):
        @property
        def iloc(self):
            return self

        def tolist(self):
            return list(self)

    def __getitem__(self, key):
        return self._Col(dict.__getitem__(self, key))
