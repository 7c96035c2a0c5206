"""Demo data: one region per seed profile, schools, classes, teachers,
students, guardians, and a user for every role (password `demo-2026!`).

Loaded through identity's own use cases, so every row also produces its
roster event and the other services fill their read copies as in production.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from chassis.config import platform_settings, service_settings
from chassis.db import Database
from chassis.privacy import resident_id_check_digit
from services.identity import schemas, service
from services.identity.models import Region, User

DEMO_PASSWORD = "demo-2026!"


@dataclass(frozen=True)
class DemoRegion:
    slug: str
    region_id: str
    name: str
    area_code: str
    school_system: str


REGIONS = (
    DemoRegion("wangcheng", "changsha-wangcheng", "长沙市望城区", "430112", "6-3"),
    DemoRegion("jinhua", "jinhua", "金华市", "330702", "6-3"),
    DemoRegion("rongchang", "chongqing-rongchang", "重庆市荣昌区", "500153", "6-3"),
    DemoRegion("huancui", "weihai-huancui", "威海市环翠区", "371002", "5-4"),
)


def demo_id_number(area_code: str, birth: str, seq: int) -> str:
    first17 = f"{area_code}{birth}{seq:03d}"
    return first17 + resident_id_check_digit(first17)


async def _user(
    db: Database,
    username: str,
    name: str,
    roles: list[str],
    tenants: list[str],
    person_id: str | None = None,
) -> None:
    await service.create_user(
        db,
        schemas.UserIn(
            username=username,
            password=DEMO_PASSWORD,
            display_name=name,
            roles=roles,
            tenants=tenants,
            person_id=person_id,
        ),
    )


async def _load_region(db: Database, r: DemoRegion, pepper: str) -> None:
    await service.upsert_region(
        db, schemas.RegionIn(id=r.region_id, name=r.name, profile_id=r.region_id)
    )
    await _user(db, f"bureau.{r.slug}", f"{r.name}教育局", ["bureau"], [f"region:{r.region_id}"])
    await _user(
        db,
        f"regulator.{r.slug}",
        f"{r.name}文旅局",
        ["regulator"],
        [f"region:{r.region_id}", "department:culture"],
    )
    school = await service.create_school(
        db,
        schemas.SchoolIn(
            region_id=r.region_id,
            name=f"{r.name.removesuffix('区').removesuffix('市')}实验小学",
            school_system=r.school_system,
            stage="primary",
        ),
    )  # type: ignore[arg-type]
    tenants = [f"school:{school.id}"]
    head = await service.create_teacher(
        db,
        school.id,
        schemas.TeacherIn(
            name="王老师",
            id_number=demo_id_number(r.area_code, "19850312", 1),
            phone="13900000001",
            subjects=["chinese"],
        ),
        pepper,
    )
    math = await service.create_teacher(
        db,
        school.id,
        schemas.TeacherIn(
            name="李老师",
            id_number=demo_id_number(r.area_code, "19900521", 2),
            phone="13900000002",
            subjects=["math"],
        ),
        pepper,
    )
    klass = await service.create_class(
        db,
        school.id,
        schemas.ClassIn(
            grade=3,
            name="三年级(1)班",
            head_teacher_id=head.id,
            subject_teachers=[
                schemas.SubjectTeacherIn(teacher_id=head.id, subject="chinese"),
                schemas.SubjectTeacherIn(teacher_id=math.id, subject="math"),
            ],
        ),
    )
    await service.create_class(db, school.id, schemas.ClassIn(grade=1, name="一年级(1)班"))
    guardian_id = None
    first_student = None
    for i, (child, parent) in enumerate(
        (("张小明", "张伟"), ("李小红", "李娜"), ("陈小刚", "陈静"))
    ):
        student = await service.create_student(
            db,
            school.id,
            schemas.StudentIn(
                class_id=klass.id,
                student_no=f"{r.slug.upper()}-2026-{i + 1:03d}",
                name=child,
                id_number=demo_id_number(r.area_code, f"2017{i + 1:02d}15", 10 + i),
            ),
            pepper,
        )
        guardian = await service.link_guardian(
            db,
            school.id,
            schemas.GuardianIn(
                name=parent,
                phone=f"138{r.area_code[:4]}{i:04d}",
                student_id=student.id,
                relation="father" if i % 2 == 0 else "mother",
            ),
        )
        if guardian_id is None:
            guardian_id, first_student = guardian.id, student.id
    await _user(db, f"admin.{r.slug}", "教务处", ["school_admin"], tenants)
    await _user(
        db, f"head.{r.slug}", "王老师（班主任）", ["head_teacher", "teacher"], tenants, head.id
    )
    await _user(db, f"teacher.{r.slug}", "李老师", ["teacher"], tenants, math.id)
    await _user(db, f"parent.{r.slug}", "张伟", ["parent"], [], guardian_id)
    await _user(db, f"student.{r.slug}", "张小明", ["student"], tenants, first_student)


async def load_demo() -> None:
    platform = platform_settings()
    db = Database(service_settings("identity").resolved_database_url(platform), service="identity")
    try:
        async with db.read() as session:
            if await session.get(Region, REGIONS[0].region_id) is not None:
                print("演示数据已存在，跳过。")
                return
        for region in REGIONS:
            await _load_region(db, region, platform.id_hash_pepper)
        all_regions = [f"region:{r.region_id}" for r in REGIONS]
        await _user(db, "auditor", "审计员", ["auditor"], all_regions)
        await _user(
            db,
            "institution.demo",
            "示范艺术培训中心",
            ["institution"],
            ["institution:demo-institution"],
        )
        await _user(db, "bank.demo", "示范监管银行", ["bank"], ["bank:demo-bank"])
        async with db.read() as session:
            users = (await session.scalars(select(User.username).order_by(User.username))).all()
        print(f"演示数据已载入：{len(users)} 个账号，密码均为 {DEMO_PASSWORD}")
    finally:
        await db.dispose()
