"""EMATeacher: exact EMA arithmetic, in-place updates, frozen teacher, buffers, ramp, state round trip."""

import torch
from torch import nn

from cpsl_hf.training.ema import EMATeacher


def _network():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def _student():
    student = _network()
    student(torch.randn(2, 3, 6, 6))  # move the BatchNorm statistics away from their initial values
    return student


def test_update_is_the_ema_formula_and_in_place():
    student = _student()
    teacher = EMATeacher(student, momentum=0.9)
    before = {name: p.detach().clone() for name, p in teacher.module.named_parameters()}
    pointers = {name: p.data_ptr() for name, p in teacher.module.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.add_(1.0)
    teacher.update(student)
    for name, p in teacher.module.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(student.named_parameters())[name].detach()
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
        assert p.data_ptr() == pointers[name]  # no re-allocation
        assert not p.requires_grad
    torch.testing.assert_close(teacher.module[1].running_mean, student[1].running_mean, rtol=0, atol=0)
    assert teacher.module[1].num_batches_tracked == student[1].num_batches_tracked


def test_teacher_is_never_back_propagated_and_stays_in_eval_mode():
    student = _student()
    teacher = EMATeacher(student)
    teacher.train()
    assert not teacher.module.training
    out = teacher(torch.randn(2, 3, 6, 6))
    assert not out.requires_grad


def test_ramp_uses_min_of_one_minus_inverse_step_and_momentum():
    student = _student()
    teacher = EMATeacher(student, momentum=0.75, ramp=True)
    observed = []
    for _ in range(6):
        observed.append(teacher.current_momentum())
        teacher.update(student)
    assert observed == [min(1 - 1 / (t + 1), 0.75) for t in range(6)]
    # t = 0: momentum 0 -> the teacher becomes the student exactly.
    other = _network()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-3.0)
    fresh = EMATeacher(other, momentum=0.75, ramp=True)
    fresh.update(student)
    for a, b in zip(fresh.module.parameters(), student.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_state_round_trip_keeps_the_ramp_counter():
    student = _student()
    teacher = EMATeacher(student, momentum=0.99, ramp=True)
    for _ in range(3):
        teacher.update(student)
    restored = EMATeacher(student, momentum=0.99, ramp=True)
    restored.load_state_dict(teacher.state_dict())
    assert restored.num_updates == 3
    assert restored.current_momentum() == teacher.current_momentum()
    restored.reset(student)
    assert restored.num_updates == 0
