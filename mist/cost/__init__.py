"""Layer 3: the differentiable cost model (operator FLOPs/bytes -> seconds via a smooth roofline)."""

from .iteration import MixedBatch as MixedBatch
from .iteration import device_time as device_time
from .iteration import iteration_breakdown as iteration_breakdown
from .iteration import iteration_time as iteration_time
from .iteration import make_batch as make_batch
from .iteration import operator_counts as operator_counts
from .params import Comm as Comm
from .params import CostParams as CostParams
from .params import Op as Op
from .params import default_params as default_params
from .params import load_params as load_params
from .params import make_params as make_params
from .params import save_params as save_params
from .replica import Gemm as Gemm
from .replica import Replica as Replica
from .replica import lower_replica as lower_replica
from .replica import stack as stack_replicas
