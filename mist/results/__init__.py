"""Results layer: per-request tables, run summaries, exports (CSV/Parquet/JSON, Chrome trace), plots."""

from .export import to_jsonable as to_jsonable
from .export import write_json as write_json
from .export import write_outputs as write_outputs
from .frame import reject_reason as reject_reason
from .frame import requests_frame as requests_frame
from .frame import select_config as select_config
from .itl import itl_mean as itl_mean
from .itl import itl_percentiles as itl_percentiles
from .plots import plot_latency_cdf as plot_latency_cdf
from .plots import plot_timeline as plot_timeline
from .seeds import summarize_seeds as summarize_seeds
from .seeds import t_quantile_975 as t_quantile_975
from .summary import SLO as SLO
from .summary import summarize as summarize
from .trace import chrome_trace as chrome_trace
