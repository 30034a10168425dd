from dmt.models.checkpoints import CHECKPOINT_FORMATS
from dmt.models.student import Student, backbone_state_dict, build_adapter
from dmt.models.teachers import FrozenTeacher, TeacherEnsemble, create_encoder, load_teacher

__all__ = ["CHECKPOINT_FORMATS", "FrozenTeacher", "Student", "TeacherEnsemble",
           "backbone_state_dict", "build_adapter", "create_encoder", "load_teacher"]
