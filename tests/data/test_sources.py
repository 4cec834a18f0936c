"""The sources on tiny fabricated files, and the H&M sample's documented counts."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from towerrec.data.schema import DataError
from towerrec.data.sources.hm import HM_CATEGORICAL, HM_TEXT, load_hm
from towerrec.data.sources.movielens import load_movielens
from towerrec.data.sources.table import load_table

# ------------------------------------------------------------------------------------ tiny H&M


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def _tiny_hm(root: Path, transactions: str | None = None) -> Path:
    _write(
        root / "transactions.csv",
        transactions
        or "t_dat,customer_id,article_id,price,sales_channel_id\n"
        "2020-01-02,c1,0100000001,0.02,2\n"
        "2020-01-01,c2,0100000002,0.03,1\n"
        "2020-01-02,c1,0100000001,0.04,1\n"  # same customer, article, day as row 1
        "2020-01-02,c1,0100000001,0.02,2\n"  # ... and identical to row 1: one more unit
        "2020-01-03,c1,0200000003,0.05,2\n",
    )
    meta = ",".join(["x"] * len(HM_CATEGORICAL))
    _write(
        root / "articles.csv",
        f"article_id,{','.join(HM_CATEGORICAL)},prod_name,detail_desc\n"
        f'0100000001,{meta},Tee,"Soft, cotton"\n'
        f"0900000009,{meta},Dress,\n",
    )
    _write(
        root / "customers.csv",
        "customer_id,FN,Active,club_member_status,fashion_news_frequency,age,postal_code\n"
        "c1,,,ACTIVE,NONE,21.0,p\nc2,1.0,1.0,,Regularly,,q\n",
    )
    for article in ["0100000001", "0100000002", "0200000003", "0300000004"]:
        _write(root / "images" / article[:3] / f"{article}.jpg", "jpeg")
    return root


def test_hm_tiny_merge(tmp_path):
    data = load_hm(str(_tiny_hm(tmp_path)))
    tx = data.interactions
    assert list(tx["item_id"]) == ["0100000001", "0100000002", "0200000003"]  # source order kept
    assert list(tx["quantity"]) == [3, 1, 1]
    assert tx["price"].iloc[0] == pytest.approx((0.02 + 0.04 + 0.02) / 3)
    assert tx["channel"].iloc[0] == 2  # first row's channel
    assert data.repaired["same_day_repeat_merged"] == 2
    assert tx["timestamp"].dtype == "datetime64[ns]"
    assert tx["user_id"].map(type).eq(str).all()
    # Catalog: articles.csv, then purchased-only, then image-only articles.
    items = data.items.set_index("item_id")
    assert list(items.index) == ["0100000001", "0900000009", "0100000002", "0200000003", "0300000004"]
    assert items.loc["0100000001", "detail_desc"] == "Soft, cotton"
    assert items.loc["0900000009", "detail_desc"] == ""
    assert items.loc["0100000002", "product_type_name"] == ""  # no metadata: empty, not an error
    assert items.loc["0100000002", "product_code"] == "100000"  # derived from the article id
    assert items.loc["0100000001", "product_code"] == "x"  # from articles.csv
    assert items.loc["0100000002", "product_code_block"] == "10"  # product code // 10,000
    assert items.loc["0100000001", "product_code_block"] == ""  # not a number
    assert items.loc["0900000009", "image_path"] is None
    assert items.loc["0300000004", "image_path"] == str((tmp_path / "images/030/0300000004.jpg").resolve())
    assert data.categorical == [*HM_CATEGORICAL, "product_code_block"] and data.text == HM_TEXT
    assert list(data.users.columns) == ["user_id", "age", "club_member_status", "fashion_news_frequency"]
    assert data.users["age"].isna().tolist() == [False, True]
    assert data.users["club_member_status"].tolist() == ["ACTIVE", ""]
    assert data.sources[str((tmp_path / "images").resolve())]["files"] == 4
    assert data.sources[str((tmp_path / "transactions.csv").resolve())]["bytes"] > 0


def test_hm_tiny_keep(tmp_path):
    data = load_hm(str(_tiny_hm(tmp_path)), same_day_repeats="keep")
    assert len(data.interactions) == 5 and set(data.interactions["quantity"]) == {1}
    assert data.repaired["same_day_repeat_merged"] == 0
    assert data.skipped["duplicate_row"] == 0  # identical H&M rows are units, not duplicates


def test_hm_bad_inputs(tmp_path):
    header = "t_dat,customer_id,article_id,price,sales_channel_id\n"
    with pytest.raises(
        DataError, match=r"transactions\.csv: row 2, column 't_dat': unparsable timestamp '2020-13-01'"
    ):
        load_hm(str(_tiny_hm(tmp_path / "a", header + "2020-01-01,c1,01,1,1\n2020-13-01,c1,01,1,1\n")))
    with pytest.raises(DataError, match=r"transactions\.csv: row 1, column 'article_id': empty id"):
        load_hm(str(_tiny_hm(tmp_path / "b", header + "2020-01-01,c1,,1,1\n")))
    with pytest.raises(DataError, match=r"transactions\.csv: missing column\(s\) 'price' \(have: t_dat,"):
        load_hm(
            str(_tiny_hm(tmp_path / "c", "t_dat,customer_id,article_id,sales_channel_id\n2020-01-01,c,a,1\n"))
        )
    data = load_hm(
        str(
            _tiny_hm(
                tmp_path / "d", header + "2020-01-01,c1,01,,1\n2020-01-01,c1,02,-1,1\n2020-01-01,c2,01,1,1\n"
            )
        )
    )
    assert data.skipped["invalid_price"] == 2 and len(data.interactions) == 1
    with pytest.raises(ValueError, match="same_day_repeats"):
        load_hm(str(tmp_path / "d"), same_day_repeats="sum")


# --------------------------------------------------------------------------------- MovieLens


def _ml100k(root: Path) -> Path:
    _write(
        root / "u.data",
        "1\t10\t5\t881250949\n2\t20\t3\t891717742\n1\t30\t4\t878887116\n1\t10\t5\t881250949\n",
    )
    flags = ["0"] * 19
    action_comedy = list(flags)
    action_comedy[1] = action_comedy[5] = "1"
    unknown = list(flags)
    unknown[0] = "1"
    _write(
        root / "u.item",
        "10|Café Society (1995)|01-Jan-1995||http://x|" + "|".join(action_comedy) + "\n"
        "20|unknown|||http://y|" + "|".join(unknown) + "\n"
        "40|Never Rated|01-Jan-1977||http://z|" + "|".join(flags) + "\n",
        encoding="latin-1",
    )
    _write(root / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    return root


def test_movielens_100k(tmp_path):
    root = _ml100k(tmp_path)
    _write(root / "posters" / "10.jpg", "jpeg")
    data = load_movielens(str(root))
    tx = data.interactions
    assert list(tx.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert list(tx["item_id"]) == ["10", "20", "30"]  # source order, duplicate dropped
    assert data.skipped["duplicate_row"] == 1
    assert tx["timestamp"].iloc[0] == pd.Timestamp(881250949, unit="s")
    assert tx["rating"].tolist() == [5.0, 3.0, 4.0]
    items = data.items.set_index("item_id")
    assert list(items.index) == ["10", "20", "40", "30"]  # 30 was rated but is not in u.item
    assert items.loc["10", "title"] == "Café Society (1995)"  # latin-1 decoded
    assert items.loc["10", "genre"] == "Action" and items.loc["10", "genres"] == "Action|Comedy"
    assert items.loc["10", "year"] == "1995" and items.loc["40", "year"] == "1977"
    assert items.loc["20", "genre"] == "" and items.loc["30", "title"] == ""
    assert items.loc["10", "image_path"].endswith("posters/10.jpg") and items.loc["20", "image_path"] is None
    assert data.categorical == ["genre", "genres", "year"] and data.text == ["title"]
    assert data.users["occupation"].tolist() == ["technician", "other"]


def test_movielens_100k_bad_rows(tmp_path):
    root = _ml100k(tmp_path)
    _write(root / "u.data", "1\t10\t5\t881250949\n1\t10\t5\n")
    with pytest.raises(DataError, match=r"^u\.data: line 2: expected 4 fields separated by '\\t', found 3$"):
        load_movielens(str(root))
    _write(root / "u.data", "1\t10\t5\t881250949\n1\t10\t5\tnoon\n")
    with pytest.raises(DataError, match=r"^u\.data: row 2, column 'ts': unparsable timestamp 'noon'"):
        load_movielens(str(root))
    with pytest.raises(DataError, match="no MovieLens ratings found"):
        load_movielens(str(tmp_path / "empty"))


def test_movielens_1m(tmp_path):
    _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    _write(
        tmp_path / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::"
        "Animation|Children's|Musical\n5::Señor: Père (2000)::Comedy\n",
        encoding="latin-1",
    )
    _write(tmp_path / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    _write(tmp_path / "art" / "661.jpg", "jpeg")
    data = load_movielens(str(tmp_path), images_dir="art")
    assert list(data.interactions["user_id"]) == ["1", "1", "2"]
    assert data.interactions["timestamp"].iloc[0] == pd.Timestamp(978300760, unit="s")
    items = data.items.set_index("item_id")
    assert list(items.index) == ["1193", "661", "5"]
    assert items.loc["661", "genre"] == "Animation"
    assert items.loc["661", "genres"] == "Animation|Children's|Musical"
    assert items.loc["5", "title"] == "Señor: Père (2000)" and items.loc["5", "year"] == "2000"
    assert items.loc["661", "image_path"] is not None and items.loc["1193", "image_path"] is None
    assert data.users["gender"].tolist() == ["F", "M"]
    assert data.skipped["duplicate_row"] == 0


def test_movielens_1m_line_errors_and_crlf(tmp_path):
    _write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation\r\n")
    _write(tmp_path / "ratings.dat", "1::1::5::978300760\r\n1::1::3::978302109::9\r\n")
    with pytest.raises(
        DataError, match=r"^ratings\.dat: line 2: expected 4 fields separated by '::', found 5$"
    ):
        load_movielens(str(tmp_path))
    _write(tmp_path / "ratings.dat", "1::1::5::978300760\r\n\r\n2::1::3::978302109\r\n")
    data = load_movielens(str(tmp_path))
    assert data.interactions["user_id"].tolist() == ["1", "2"]
    assert data.interactions["timestamp"].iloc[1] == pd.Timestamp(978302109, unit="s")
    assert data.items["title"].tolist() == ["Toy Story (1995)"]


def test_movielens_1m_without_posters_and_empty_user(tmp_path):
    _write(tmp_path / "ratings.dat", "1::1::5::978300760\n::1::3::978302109\n")
    _write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation\n")
    with pytest.raises(DataError, match=r"^ratings\.dat: row 2, column 'user': empty id$"):
        load_movielens(str(tmp_path))
    _write(tmp_path / "ratings.dat", "1::1::5::978300760\n")
    data = load_movielens(str(tmp_path))
    assert data.items["image_path"].isna().all()


# ------------------------------------------------------------------------------------- tables


def _table_files(root: Path, fmt: str) -> tuple[str, str]:
    inter = pd.DataFrame(
        {
            "customer": ["u1", "u2", "u1", "u1", "u3", "u2"],
            "sku": ["A", "B", "A", "Z", "B", "C"],
            "ts": [
                "2021-03-01 10:00",
                "2021-03-01 09:00",
                "2021-03-01 10:00",
                "2021-03-02",
                "2021-03-03",
                "2021-03-04",
            ],
            "amount": [1.0, 2.0, 1.0, 3.0, -1.0, 4.0],
        }
    )
    items = pd.DataFrame(
        {
            "sku": ["A", "B", "C", "D"],
            "colour": ["red", None, "blue", "red"],
            "name": ["Alpha", "Beta", None, "Delta"],
            "img": ["a.png", "missing.png", None, "d.png"],
        }
    )
    (root / "pics").mkdir(parents=True, exist_ok=True)
    (root / "pics" / "a.png").write_bytes(b"png")
    (root / "pics" / "d.png").write_bytes(b"png")
    if fmt == "csv":
        inter.to_csv(root / "events.csv", index=False)
        items.to_csv(root / "catalog.csv", index=False)
        return "events.csv", "catalog.csv"
    inter.assign(ts=pd.to_datetime(inter["ts"], format="ISO8601")).to_parquet(root / "events.parquet")
    items.to_parquet(root / "catalog.parquet")
    return "events.parquet", "catalog.parquet"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_with_items(tmp_path, fmt):
    inter, items = _table_files(tmp_path, fmt)
    data = load_table(
        str(tmp_path),
        inter,
        items,
        columns={"user_id": "customer", "item_id": "sku", "timestamp": "ts", "price": "amount"},
        item_columns={"item_id": "sku", "colour": "colour", "title": "name", "image": "img"},
        categorical=["colour"],
        text=["title"],
        image_dir="pics",
    )
    tx = data.interactions
    # Row 3 duplicates row 1, row 4 has an unknown item, row 5 a negative price.
    assert data.skipped == {
        "duplicate_row": 1,
        "unknown_item": 1,
        "invalid_price": 1,
        "duplicate_item_row": 0,
    }
    assert list(tx["item_id"]) == ["A", "B", "C"] and list(tx["user_id"]) == ["u1", "u2", "u2"]
    assert tx["timestamp"].tolist()[:2] == [
        pd.Timestamp("2021-03-01 10:00"),
        pd.Timestamp("2021-03-01 09:00"),
    ]
    assert tx["price"].tolist() == [1.0, 2.0, 4.0]
    it = data.items.set_index("item_id")
    assert list(it.index) == ["A", "B", "C", "D"]  # never-bought D stays in the catalog
    assert it.loc["B", "colour"] == "" and it.loc["C", "title"] == ""
    assert it.loc["A", "image_path"] == str((tmp_path / "pics" / "a.png").resolve())
    # a named but missing file keeps its path: the image cache counts it as missing_file
    assert it.loc["B", "image_path"] == str((tmp_path / "pics" / "missing.png").resolve())
    assert it.loc["C", "image_path"] is None
    assert data.categorical == ["colour"] and data.text == ["title"]
    assert str((tmp_path / "pics").resolve()) in data.sources


def test_table_without_items_unix_seconds(tmp_path):
    _write(tmp_path / "log.csv", "user,item,time,quantity\n7,0042,86400,2\n8,0042,0,1\n7,0042,86400,2\n")
    data = load_table(
        str(tmp_path), "log.csv", columns={"user_id": "user", "item_id": "item", "timestamp": "time"}
    )
    tx = data.interactions
    assert list(tx["item_id"]) == ["0042", "0042"]  # ids stay strings, leading zeros kept
    assert tx["timestamp"].tolist() == [pd.Timestamp("1970-01-02"), pd.Timestamp("1970-01-01")]
    assert tx["quantity"].tolist() == [2, 1]
    assert data.skipped["duplicate_row"] == 1
    assert list(data.items.columns) == ["item_id", "image_path"] and list(data.items["item_id"]) == ["0042"]


def test_table_numeric_parquet_ids_and_timestamp_format(tmp_path):
    pd.DataFrame(
        {"user_id": [1, 2], "item_id": [10, 11], "timestamp": ["01/02/2021", "03/02/2021"]}
    ).to_parquet(tmp_path / "x.parquet")
    data = load_table(str(tmp_path), "x.parquet", timestamp_format="%d/%m/%Y")
    assert list(data.interactions["user_id"]) == ["1", "2"]
    assert data.interactions["timestamp"].iloc[1] == pd.Timestamp("2021-02-03")


def test_table_bad_inputs(tmp_path):
    _write(tmp_path / "a.csv", "user_id,item_id,timestamp\nu,i,2021-01-01\nu,i,\n")
    with pytest.raises(DataError, match=r"^a\.csv: row 2, column 'timestamp': missing timestamp$"):
        load_table(str(tmp_path), "a.csv")
    _write(tmp_path / "b.csv", "user_id,sku,timestamp\nu,i,2021-01-01\n")
    with pytest.raises(
        DataError, match=r"^b\.csv: missing column\(s\) 'item_id' \(have: user_id, sku, timestamp\)$"
    ):
        load_table(str(tmp_path), "b.csv")
    _write(tmp_path / "c.csv", "user_id,item_id,timestamp\nu,i,2021-01-01\n")
    _write(tmp_path / "items.csv", "item_id,colour\ni,red\n,blue\n")
    with pytest.raises(DataError, match=r"^items\.csv: row 2, column 'item_id': empty id$"):
        load_table(str(tmp_path), "c.csv", "items.csv", categorical=["colour"])
    _write(tmp_path / "items.csv", "item_id,name\ni,x\n")
    with pytest.raises(DataError, match=r"^items\.csv: missing column\(s\) 'colour'"):
        load_table(str(tmp_path), "c.csv", "items.csv", categorical=["colour"])
    (tmp_path / "d.csv").write_bytes(b"user_id,item_id,timestamp\nu,caf\xe9,2021-01-01\n")
    with pytest.raises(DataError, match=r"^d\.csv: line 2: invalid UTF-8 byte 0xe9"):
        load_table(str(tmp_path), "d.csv")
    with pytest.raises(DataError, match=r"^e\.json: unsupported file type"):
        load_table(str(tmp_path), "e.json")


# ---------------------------------------------------------------------------------- the H&M sample

HM_ROOT = Path(
    os.environ.get("TOWERREC_HM_ROOT", Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hm")
)
needs_hm = pytest.mark.skipif(
    not (HM_ROOT / "transactions.csv").is_file(),
    reason=f"H&M sample not found at {HM_ROOT} (set TOWERREC_HM_ROOT to its folder)",
)


@pytest.mark.hm
@needs_hm
def test_hm_sample_counts_keep():
    data = load_hm(str(HM_ROOT), same_day_repeats="keep")  # its speed: scripts/bench_prepare.py
    tx, items = data.interactions, data.items
    assert len(tx) == 31_662
    assert len(data.users) == 1_364 and tx["user_id"].nunique() == 1_364
    purchased = set(tx["item_id"])
    assert len(purchased) == 17_033
    assert tx["timestamp"].min() == pd.Timestamp("2018-09-20") and tx["timestamp"].max() == pd.Timestamp(
        "2020-09-22"
    )
    assert tx["timestamp"].nunique() == 733
    # 3,146 rows repeat an earlier row's (customer, article, day); they fall in 2,637 groups.
    assert tx.duplicated(["user_id", "item_id", "timestamp"]).sum() == 3_146
    assert data.sources[str(HM_ROOT.resolve() / "images")]["files"] == 24_717
    assert items["image_path"].notna().sum() == 24_717 and len(items) == 24_717
    assert items["item_id"].str.fullmatch(r"\d{10}").all() and items["item_id"].str.startswith("0").any()
    with_meta = items[items["product_type_name"] != ""]
    assert len(with_meta) == 11_800  # the articles.csv rows
    assert len(set(with_meta["item_id"]) - purchased) == 7_684
    assert len(set(with_meta["item_id"]) & purchased) == 4_116
    assert items.set_index("item_id").loc[list(purchased), "image_path"].notna().all()
    assert sum(data.skipped.values()) == 0


@pytest.mark.hm
@needs_hm
def test_hm_sample_counts_merge():
    data = load_hm(str(HM_ROOT))
    merged = data.repaired["same_day_repeat_merged"]
    assert merged == 3_146
    assert len(data.interactions) == 31_662 - merged
    assert data.interactions["quantity"].sum() == 31_662
    assert not data.interactions.duplicated(["user_id", "item_id", "timestamp"]).any()
