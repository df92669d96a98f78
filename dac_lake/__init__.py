"""dac-lake: a Data Access Centre for survey astronomy on a HATS lake (object storage or a local folder)."""

from dac_lake.session import Session, connect

__all__ = ["Session", "connect"]
__version__ = "0.1.0"
