"""Layer 2: deployments, config files and workloads lowered to fixed-shape engine arrays."""

from .deployment import ClientSpec as ClientSpec
from .deployment import Deployment as Deployment
from .deployment import LinkSpec as LinkSpec
from .deployment import Lowered as Lowered
from .deployment import PipelineSpec as PipelineSpec
from .deployment import StageSpec as StageSpec
from .deployment import bucket as bucket
from .deployment import lower as lower
from .deployment import lower_workload as lower_workload
from .deployment import stack_lowered as stack_lowered
