"""The paper's vector-space simulation on MovieLens and its sweep: an application of the
round engine (``crowdsft.tournament``). Needs the ``sim`` extra for plots; the product never
imports it (the CLI loads it lazily)."""
